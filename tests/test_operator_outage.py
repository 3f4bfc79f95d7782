"""An API outage: every request answered 503, then the API returns. The operator must stay alive, retry with
a capped backoff (kopf's requests and watches included: kopf escalates after its default 9 attempts, and a
failed resource observer ends the process), and converge afterwards.

The outage is shortened, not the mechanism: the operator runs with small retry delays, and the outage lasts
until one request has failed more often than kopf's default 9 attempts (awaited on the emulator's request
log), which is what made the operator exit with the defaults (a 60 s outage, delays 1, 1, 2, ... 21 s).
"""

from __future__ import annotations

import collections

from finetune_operator.controller.handlers import CappedBackoff

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .emulator.emulator import RequestRecord
from .test_operator_harness import OperatorThread, fast_config, minimal, succeed, wait_child, wait_state

cluster = harness.cluster

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
#: Attempts kopf makes with its default error backoffs before it escalates (1 + 8 retries).
KOPF_DEFAULT_ATTEMPTS = 9


class Refused:
    """Counts the list/watch requests per resource that arrive while the outage lasts (each answered 503), and
    wakes ``wait_for`` on every one (the request log itself notifies nobody)."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, rec: RequestRecord, data: object) -> None:
        if rec.verb in ("list", "watch"):
            with self.server.emulator.changed:
                self.counts[rec.resource] += 1
                self.server.emulator.changed.notify_all()


def test_the_operator_outlives_an_api_outage_and_converges(cluster: EmulatorServer) -> None:
    op = OperatorThread(fast_config(api_retry_initial=0.05, api_retry_max=0.2)).start()
    try:
        cluster.create(minimal("outage"))
        wait_child(cluster, "Job", "outage-sft")
        wait_state(cluster, "outage", "Running")

        refused = Refused(cluster)
        cluster.emulator.hooks.append(refused)
        cluster.fail(VERBS, None, status=503, count=None)
        cluster.emulator.drop_watches()  # an outage also ends the open watch streams
        succeed(cluster, "Job", "outage-sft")  # meanwhile the workload finishes (written past the outage)
        # kopf's resource observer (CRDs) and the FineTuneJob watcher keep retrying past kopf's default.
        cluster.wait_for(
            lambda: (
                refused.counts["customresourcedefinitions"] > KOPF_DEFAULT_ATTEMPTS + 2
                and refused.counts["finetunejobs"] > KOPF_DEFAULT_ATTEMPTS + 2
            ),
            timeout=60,
            message="kopf stopped retrying during the outage",
        )
        assert op.error is None and op._thread is not None and op._thread.is_alive()

        cluster.emulator.clear_faults()
        cluster.emulator.hooks.remove(refused)
        status = wait_state(cluster, "outage", "Succeeded", timeout=60)
        assert status["stages"][0]["state"] == "Succeeded"
    finally:
        op.stop()


def test_capped_backoff_never_ends_and_is_capped() -> None:
    backoff = CappedBackoff(1.0, 30.0)
    assert not hasattr(backoff, "__len__")  # kopf counts attempts only for sized backoffs: never escalates
    delays = [d for _, d in zip(range(50), backoff, strict=False)]
    assert len(delays) == 50 and max(delays) <= 30.0 and delays[0] <= 1.0
    assert delays[-1] >= 15.0  # exponential up to the cap (with jitter of at most half)
    assert next(iter(backoff)) <= 1.0  # re-iterable: every request starts over
