"""Restart safety and API faults: the operator may die between any two API calls, the API may answer
409/429/500 or drop watches, and every pipeline still finishes with no duplicate child and no lost transition.

The crash tests drive the reconciler directly (no kopf) so that the "process" can be killed precisely before
(or just after) the N-th API call, for every N of a whole pipeline with a failed-and-retried stage; a new
reconciler with empty memory, like a restarted pod, then takes over. One more test restarts the real kopf
operator mid-pipeline, and the fault tests run the real operator against injected API errors.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import pytest

from finetune_operator.api import constants as c
from finetune_operator.controller import children as ch
from finetune_operator.controller.kube import Kube, RestKube, connect
from finetune_operator.controller.reconciler import Reconciler, ReconcilerConfig
from finetune_operator.controller.runtime import OperatorConfig, make_render, make_validate

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .test_operator_harness import (
    RESOURCE,
    OperatorThread,
    children,
    condition,
    fail_child,
    ftj_status,
    minimal,
    succeed,
    wait_child,
    wait_state,
)

cluster = harness.cluster

FINAL = ("Serving", "Succeeded", "Failed")


def pipeline(name: str, namespace: str, *, full: bool = True) -> dict[str, Any]:
    """[download ->] sft -> dpo -> merge -> serve (download is a Job like sft: ``full=False`` leaves it out
    where the test runs the pipeline a hundred times)."""
    doc = minimal(name, retries=1)
    doc["metadata"]["namespace"] = namespace
    spec = doc["spec"]
    if full:
        spec["model"]["source"] = "org/tiny"
    spec["datasets"].append(
        {
            "name": "prefs",
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
            "volume": {"claimName": "data", "subPath": "p"},
        }
    )
    spec["stages"].append({"name": "dpo", "type": "dpo", "datasets": ["prefs"], "method": "lora"})
    spec["merge"] = {"enabled": True}
    spec["serve"] = {"enabled": True, "resources": {"gpusPerNode": 1}}
    return doc


class Crash(BaseException):
    """The operator process dies (BaseException: nothing in the reconciler may swallow it)."""


class CrashingKube:
    """Performs API calls until the ``crash_at``-th, then dies before it (or just after it: a lost response)."""

    def __init__(self, inner: Kube, crash_at: int, after: bool) -> None:
        self.inner, self.crash_at, self.after, self.calls = inner, crash_at, after, 0

    async def _call(self, coro: Any) -> Any:
        n = self.calls
        self.calls += 1
        if n == self.crash_at and not self.after:
            coro.close()
            raise Crash
        result = await coro
        if n == self.crash_at:
            raise Crash
        return result

    async def get(self, *a: Any) -> Any:
        return await self._call(self.inner.get(*a))

    async def create(self, obj: Mapping[str, Any]) -> Any:
        return await self._call(self.inner.create(obj))

    async def patch(self, *a: Any, **kw: Any) -> Any:
        return await self._call(self.inner.patch(*a, **kw))

    async def delete(self, *a: Any) -> Any:
        return await self._call(self.inner.delete(*a))

    async def list(self, *a: Any) -> Any:
        return await self._call(self.inner.list(*a))

    async def post_raw(self, *a: Any, **kw: Any) -> Any:
        return await self._call(self.inner.post_raw(*a, **kw))


async def drive(
    server: EmulatorServer, kube: Kube, name: str, ns: str, crash_at: int | None, after: bool, *, full: bool = False
) -> int:
    """Run one pipeline to its end, playing the controllers (failing dpo's first attempt); return API calls."""
    config = OperatorConfig()
    events: list[tuple[str, str, str]] = []

    def make(k: Kube) -> Reconciler:
        return Reconciler(
            k,
            validate=make_validate(),
            render=make_render(config),
            events=lambda obj, type, reason, message: events.append((type, reason, message)),
            config=ReconcilerConfig(progress_interval=0),
        )

    crashing = CrashingKube(kube, crash_at if crash_at is not None else -1, after)
    reconciler, crashed = make(crashing), False
    doc = pipeline(name, ns, full=full)
    plan = make_render(config)(make_validate()(doc))
    server.create(doc)
    failed_dpo = False
    for _ in range(100):
        try:
            await reconciler.reconcile(ns, name)
        except Crash:
            assert not crashed
            reconciler, crashed = make(kube), True  # a new process: nothing remembered
            continue
        status = ftj_status(server, name, ns)
        if status.get("state") in FINAL:
            break
        if not status.get("currentStage"):
            continue
        step = plan.step(status["currentStage"])
        wl = step.workload
        obj = server.get(RESOURCE[wl["kind"]], wl["metadata"]["name"], ns)
        if obj is None or ch.interpret(obj).phase in (ch.Phase.SUCCEEDED, ch.Phase.FAILED):
            continue
        if step.name == "dpo" and not failed_dpo:
            fail_child(server, wl["kind"], wl["metadata"]["name"], ns)
            failed_dpo = True
        else:
            succeed(server, wl["kind"], wl["metadata"]["name"], ns)
    else:
        raise AssertionError(f"pipeline did not finish: {ftj_status(server, name, ns)}")

    # ---- invariants: exactly the planned children, attempts counted once, every transition recorded
    status = ftj_status(server, name, ns)
    assert status["state"] == "Serving", status
    expected = sorted((o["kind"], o["metadata"]["name"]) for o in plan.objects())
    assert sorted(children(server, name, ns)) == expected
    attempts = {s["name"]: s["attempts"] for s in status["stages"]}
    steps = ["download", "sft", "dpo", "merge", "serve"] if full else ["sft", "dpo", "merge", "serve"]
    assert attempts == {s: 2 if s == "dpo" else 1 for s in steps}, attempts
    assert ch.attempt_of(server.get("jobs.batch", f"{name}-dpo", ns)) == 2
    assert [s["state"] for s in status["stages"]] == ["Succeeded"] * (len(steps) - 1) + ["Running"]
    assert all(s.get("startTime") and s.get("completionTime") for s in status["stages"][:-1])
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Succeeded")["status"] == "True"
    assert status["outputs"]["endpoint"].startswith(f"http://{name}-serve.{ns}.svc")
    transitions = [e for e in events if e[1] in (c.Reason.STAGE_STARTED, c.Reason.STAGE_SUCCEEDED)]
    assert len(transitions) == len(set(transitions)), "an event was posted twice"
    return crashing.calls


@pytest.fixture()
async def kube(cluster: EmulatorServer, use_kubeconfig: pathlib.Path) -> Any:
    assert use_kubeconfig.is_file()  # exported as $KUBECONFIG, which the login reads
    request, close = await connect(in_cluster=False)
    yield RestKube(request, backoff=0.01)
    await close()


async def test_a_restart_between_any_two_api_calls_loses_nothing(cluster: EmulatorServer, kube: Kube) -> None:
    assert await drive(cluster, kube, "full", "default", None, False, full=True) > 30
    total = await drive(cluster, kube, "base", "default", None, False)
    assert total > 20  # sft, dpo (failed once, retried), merge, serve
    for n in range(total):
        for after in (False, True):
            ns = f"crash-{n}-{'after' if after else 'before'}"
            cluster.ensure_namespace(ns)
            cluster.emulator.clear_request_log()  # kmock re-checks its log on every request: keep it short
            await drive(cluster, kube, "p", ns, n, after)


def test_the_real_operator_restarted_mid_pipeline_continues(cluster: EmulatorServer) -> None:
    doc = pipeline("resume", "default")
    cluster.create(doc)
    op = OperatorThread().start()
    try:
        wait_child(cluster, "Job", "resume-download")
        succeed(cluster, "Job", "resume-download")
        wait_child(cluster, "Job", "resume-sft")
    finally:
        op.stop()
    succeed(cluster, "Job", "resume-sft")  # while no operator runs
    op = OperatorThread().start()
    try:
        wait_child(cluster, "Job", "resume-dpo")
        succeed(cluster, "Job", "resume-dpo")
        wait_child(cluster, "Job", "resume-merge")
        succeed(cluster, "Job", "resume-merge")
        dep = cluster.wait_for_object("deployments.apps", "resume-serve")
        harness.make_available(cluster, dep["metadata"]["name"])
        status = wait_state(cluster, "resume", "Serving")
    finally:
        op.stop()
    assert {s["name"]: s["attempts"] for s in status["stages"]} == dict.fromkeys(
        ["download", "sft", "dpo", "merge", "serve"], 1
    )


FAULTS = {
    "create-500-lost": [("create", "jobs", {"status": 500, "count": 2, "lost": True})],
    "create-500": [("create", "jobs", {"status": 500, "count": 2})],
    "create-429": [("create", "configmaps", {"status": 429, "count": 2, "retry_after": 0})],
    "create-409": [("create", "jobs", {"status": 409, "count": 1})],
    "status-409": [("patch", "finetunejobs", {"status": 409, "count": 3, "subresource": "status"})],
    "status-500-lost": [("patch", "finetunejobs", {"status": 500, "count": 3, "subresource": "status", "lost": True})],
    "get-429": [("get", "jobs", {"status": 429, "count": 3, "retry_after": 0})],
    "mixed": [
        ("create", "jobs", {"status": 500, "count": 1, "lost": True}),
        ("patch", "finetunejobs", {"status": 409, "count": 2, "subresource": "status"}),
        ("get", "finetunejobs", {"status": 503, "count": 2}),
    ],
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_pipelines_finish_despite_api_faults(cluster: EmulatorServer, fault: str) -> None:
    doc = minimal("faulty", retries=0)
    doc["spec"]["model"]["source"] = "org/tiny"
    doc["spec"]["merge"] = {"enabled": True}
    op = OperatorThread().start()
    try:
        for verbs, resource, kw in FAULTS[fault]:
            cluster.fail(verbs, resource, **kw)
        cluster.create(doc)
        for step in ("download", "sft", "merge"):
            wait_child(cluster, "Job", f"faulty-{step}")
            if step == "sft":
                cluster.drop_watches()  # and the watch streams break once
            succeed(cluster, "Job", f"faulty-{step}")
        status = wait_state(cluster, "faulty", "Succeeded", timeout=30)
    finally:
        op.stop()
    assert [s["attempts"] for s in status["stages"]] == [1, 1, 1]
    identity = [("ServiceAccount", "faulty-worker"), ("Role", "faulty-worker"), ("RoleBinding", "faulty-worker")]
    assert sorted(children(cluster, "faulty")) == sorted(
        [
            ("ConfigMap", "faulty-config"),
            *identity,
            ("Job", "faulty-download"),
            ("Job", "faulty-sft"),
            ("Job", "faulty-merge"),
        ]
    )
