"""Operator behaviour beyond the happy path: retries, invalid specs, suspend, refused edits, deletion, drift,
Kueue, scaling and progress. Real kopf against the emulator; the test plays the workload controllers."""

from __future__ import annotations

import time
from typing import Any

import pytest

from finetune_operator import backends
from finetune_operator.api import constants as c
from finetune_operator.controller import children as ch

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .test_operator_harness import (
    FTJ,
    RESOURCE,
    OperatorThread,
    children,
    condition,
    events,
    fail_child,
    ftj_status,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

cluster = harness.cluster
operator = harness.operator

WORKLOAD = {name: b.kind for name, b in backends.REGISTRY.items()}


def requests(server: EmulatorServer, verb: str, resource: str, subresource: str | None = None) -> int:
    return sum(
        1
        for r in server.emulator.request_log
        if r.verb == verb and r.resource == resource and (subresource is None or r.subresource == subresource)
    )


# ------------------------------------------------------------------------------------------------ retries


@pytest.mark.parametrize("backend", backends.names())
def test_failed_stage_is_retried_then_fails_with_the_childs_reason(
    cluster: EmulatorServer, operator: OperatorThread, backend: str
) -> None:
    kind = WORKLOAD[backend]
    cluster.create(minimal("retry", backend=backend, retries=1))
    wait_child(cluster, kind, "retry-sft", attempt=1)
    fail_child(cluster, kind, "retry-sft", reason="OOMKilledTwice")

    second = wait_child(cluster, kind, "retry-sft", attempt=2)
    assert ch.interpret(second).phase != ch.Phase.FAILED  # a fresh workload, not the failed one
    status = cluster.wait_for(
        lambda: (s := ftj_status(cluster, "retry")).get("stages", [{}])[0].get("attempts") == 2 and s
    )
    assert status["stages"][0]["state"] == "Running"
    fail_child(cluster, kind, "retry-sft", reason="OOMKilledTwice")

    status = wait_state(cluster, "retry", "Failed")
    stage = status["stages"][0]
    assert stage["state"] == "Failed" and stage["attempts"] == 2
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == c.Reason.RETRIES_EXHAUSTED
    assert "OOMKilledTwice" in failed["message"] and "2 attempts" in failed["message"]
    assert condition(status, "Ready")["status"] == "False"
    wait_event(cluster, "retry", c.Reason.RETRIES_EXHAUSTED)
    retried = wait_event(cluster, "retry", c.Reason.STAGE_RETRYING)
    assert "attempt 2" in retried[0][2]
    # Terminal: no third workload, however often the operator looks again.
    operator.wait_reconciled("retry")
    assert ch.attempt_of(cluster.get(RESOURCE[kind], "retry-sft")) == 2


def test_a_retry_that_succeeds_finishes_the_pipeline(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("flaky", retries=2))
    wait_child(cluster, "Job", "flaky-sft")
    fail_child(cluster, "Job", "flaky-sft")
    wait_child(cluster, "Job", "flaky-sft", attempt=2)
    succeed(cluster, "Job", "flaky-sft")
    status = wait_state(cluster, "flaky", "Succeeded")
    assert status["stages"][0]["attempts"] == 2
    assert condition(status, "Ready")["status"] == "True"


# ------------------------------------------------------------------------------------------------ invalid spec


def test_invalid_spec_fails_once_with_every_error_and_creates_nothing(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    doc = minimal("bad")
    doc["spec"]["stages"][0]["datasets"] = ["nope"]
    doc["spec"]["stages"][0]["method"] = "full"
    doc["spec"]["stages"][0]["lora"] = {"rank": 8}
    cluster.create(doc)
    status = wait_state(cluster, "bad", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.INVALID_SPEC
    assert "spec.stages[0].datasets[0]" in failed["message"]
    assert "spec.stages[0].lora" in failed["message"]
    (event,) = wait_event(cluster, "bad", c.Reason.INVALID_SPEC)
    assert event[0] == "Warning" and "spec.stages[0].datasets[0]" in event[2]

    # No retry loop: later reconciles neither write again nor create anything.
    writes = requests(cluster, "patch", "finetunejobs", "status")
    operator.wait_reconciled("bad")
    assert requests(cluster, "patch", "finetunejobs", "status") == writes
    assert children(cluster, "bad") == []
    assert len(events(cluster, "bad")) == 1

    # Fixing the spec starts the pipeline.
    cluster.patch(FTJ, "bad", {"spec": {"stages": [{"name": "sft", "type": "sft", "datasets": ["chat"]}]}})
    wait_child(cluster, "Job", "bad-sft")
    status = wait_state(cluster, "bad", "Running")
    assert condition(status, "Failed")["status"] == "False"


# ------------------------------------------------------------------------------------------------ suspend


@pytest.mark.parametrize("backend", backends.names())
def test_suspend_and_resume_the_running_workload(
    cluster: EmulatorServer, operator: OperatorThread, backend: str
) -> None:
    kind = WORKLOAD[backend]
    cluster.create(minimal("pause", backend=backend))
    wait_child(cluster, kind, "pause-sft")
    cluster.patch(FTJ, "pause", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: ch.is_suspended(cluster.get(RESOURCE[kind], "pause-sft")), message="not suspended")
    status = wait_state(cluster, "pause", "Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Progressing")["status"] == "False"
    assert status["stages"][0]["state"] == "Suspended"

    cluster.patch(FTJ, "pause", {"spec": {"suspend": False}})
    cluster.wait_for(lambda: not ch.is_suspended(cluster.get(RESOURCE[kind], "pause-sft")), message="not resumed")
    status = wait_state(cluster, "pause", "Running")
    assert condition(status, "Suspended")["status"] == "False"
    wait_event(cluster, "pause", c.Reason.RESUMED)
    assert ch.attempt_of(cluster.get(RESOURCE[kind], "pause-sft")) == 1  # the same workload, not a new one


def test_kueue_suspended_workloads_are_left_to_kueue(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("queued", scheduling={"queueName": "team-a"}))
    job = wait_child(cluster, "Job", "queued-sft")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][c.LABEL_KUEUE_QUEUE] == "team-a"
    status = cluster.wait_for(lambda: (s := ftj_status(cluster, "queued")).get("stages") and s)
    operator.wait_reconciled("queued")
    assert cluster.get("jobs.batch", "queued-sft")["spec"]["suspend"] is True  # never unsuspended by us
    status = ftj_status(cluster, "queued")
    assert "Kueue" in status["stages"][0]["message"] and status["state"] == "Running"

    cluster.patch("jobs.batch", "queued-sft", {"spec": {"suspend": False}})  # Kueue admits it
    operator.wait_reconciled("queued")
    assert cluster.get("jobs.batch", "queued-sft")["spec"]["suspend"] is False  # nor re-suspended

    # A user's suspend is applied; the user's resume hands the workload back to Kueue (which unsuspends).
    cluster.patch(FTJ, "queued", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: cluster.get("jobs.batch", "queued-sft")["spec"]["suspend"] is True)
    cluster.patch(FTJ, "queued", {"spec": {"suspend": False}})
    cluster.wait_for(
        lambda: (
            ch.ANNOTATION_SUSPENDED_BY_USER
            not in cluster.get("jobs.batch", "queued-sft")["metadata"].get("annotations", {})
        )
    )
    assert cluster.get("jobs.batch", "queued-sft")["spec"]["suspend"] is True


# ------------------------------------------------------------------------------------------------ edits


def test_immutable_edits_are_refused_and_the_accepted_spec_is_driven(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("edit"))
    before = wait_child(cluster, "Job", "edit-sft")
    cluster.patch(FTJ, "edit", {"spec": {"model": {"template": "llama3"}, "output": {"volume": {"claimName": "x"}}}})
    (event,) = wait_event(cluster, "edit", c.Reason.IMMUTABLE_FIELD)
    assert event[0] == "Warning" and "spec.model" in event[2] and "spec.output" in event[2]
    status = cluster.wait_for(
        lambda: condition(s := ftj_status(cluster, "edit"), "SpecAccepted").get("status") == "False" and s
    )
    assert condition(status, "SpecAccepted")["reason"] == c.Reason.IMMUTABLE_FIELD
    assert cluster.get("jobs.batch", "edit-sft")["spec"] == before["spec"]
    succeed(cluster, "Job", "edit-sft")
    status = wait_state(cluster, "edit", "Succeeded")
    assert "/mnt/volumes/outputs/" in str(status["outputs"])  # the accepted output volume, not the edit

    # Reverting the edit clears the condition.
    cluster.patch(
        FTJ, "edit", {"spec": {"model": {"template": "qwen"}, "output": {"volume": {"claimName": "outputs"}}}}
    )
    cluster.wait_for(lambda: condition(ftj_status(cluster, "edit"), "SpecAccepted").get("status") == "True")


def test_serve_replicas_and_suspend_scale_the_deployment(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("srv", serve={"enabled": True, "replicas": 1, "resources": {"gpusPerNode": 1}}))
    wait_child(cluster, "Job", "srv-sft")
    succeed(cluster, "Job", "srv-sft")
    dep = cluster.wait_for_object("deployments.apps", "srv-serve")
    status = ftj_status(cluster, "srv")
    assert condition(status, "Ready")["status"] == "False"
    assert "endpoint" not in (status.get("outputs") or {})  # not before the Deployment is available
    harness.make_available(cluster, dep["metadata"]["name"])
    status = wait_state(cluster, "srv", "Serving")
    assert status["outputs"]["endpoint"] == "http://srv-serve.default.svc:8000/v1"
    assert condition(status, "Ready")["status"] == "True"

    cluster.patch(FTJ, "srv", {"spec": {"serve": {"replicas": 3}}})
    cluster.wait_for(lambda: cluster.get("deployments.apps", "srv-serve")["spec"]["replicas"] == 3)
    wait_event(cluster, "srv", c.Reason.SCALED)
    assert condition(ftj_status(cluster, "srv"), "SpecAccepted")["status"] == "True"  # a mutable field

    # Suspending a served model scales it to zero and withdraws the endpoint; resuming brings it back.
    cluster.patch(FTJ, "srv", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: cluster.get("deployments.apps", "srv-serve")["spec"]["replicas"] == 0)
    status = wait_state(cluster, "srv", "Suspended")
    assert condition(status, "Ready")["status"] == "False" and "endpoint" not in status.get("outputs", {})
    cluster.patch(FTJ, "srv", {"spec": {"suspend": False}})
    cluster.wait_for(lambda: cluster.get("deployments.apps", "srv-serve")["spec"]["replicas"] == 3)
    harness.make_available(cluster, "srv-serve")
    assert wait_state(cluster, "srv", "Serving")["outputs"]["endpoint"] == "http://srv-serve.default.svc:8000/v1"


# ------------------------------------------------------------------------------------------------ delete, drift


def test_deleting_the_finetunejob_cascades_to_every_child(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("gone"))
    wait_child(cluster, "Job", "gone-sft")
    assert ("ConfigMap", "gone-config") in children(cluster, "gone")
    cluster.delete(FTJ, "gone")
    cluster.wait_for(lambda: children(cluster, "gone") == [], message="children not garbage-collected")
    assert cluster.get(FTJ, "gone") is None  # no finalizer held it back


def test_deleted_children_are_recreated(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("drift"))
    first = wait_child(cluster, "Job", "drift-sft")
    cluster.wait_for(lambda: ftj_status(cluster, "drift").get("stages"))
    cluster.delete("jobs.batch", "drift-sft")
    again = cluster.wait_for_object(
        "jobs.batch", "drift-sft", condition=lambda o: o["metadata"]["uid"] != first["metadata"]["uid"]
    )
    assert ch.attempt_of(again) == 1  # drift repair is not a retry
    wait_event(cluster, "drift", c.Reason.CHILD_RECREATED)

    # The ConfigMap has no status events of its own: the resync timer's drift check notices it is gone (the tick
    # is asked for here; the timer itself is at its long default).
    cluster.delete("configmaps", "drift-config")
    operator.resync("drift", deep=True)
    cluster.wait_for_object("configmaps", "drift-config", timeout=15)
    assert ftj_status(cluster, "drift")["stages"][0]["attempts"] == 1


# ------------------------------------------------------------------------------------------------ progress


def test_worker_progress_is_folded_into_the_printer_columns(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("prog"))
    wait_child(cluster, "Job", "prog-sft")
    report: dict[str, Any] = {"step": 12, "totalSteps": 100, "loss": 0.51234, "epoch": 0.4, "eta": "0:05:00"}
    cluster.patch_status(FTJ, "prog", {"reported": {"sft": report}})
    status = cluster.wait_for(lambda: (s := ftj_status(cluster, "prog")).get("progress") and s)
    assert status["progress"] == "12/100 (12%)"
    assert status["loss"] == "0.5123"
    assert status["stages"][0]["progress"]["step"] == 12
    assert status["reported"]["sft"]["step"] == 12  # the worker's field is left alone

    cluster.patch_status(FTJ, "prog", {"reported": {"sft": {**report, "step": 50}}})
    cluster.wait_for(lambda: ftj_status(cluster, "prog").get("progress") == "50/100 (50%)")


def test_reported_steps_become_the_stages_loss_history(cluster: EmulatorServer, operator: OperatorThread) -> None:
    """Each new step a worker reports becomes a point of ``status.stages[].history`` (what ``ftctl plot --job``
    and the console draw); a report without a usable loss adds nothing."""

    def sft() -> dict[str, Any]:
        return next(iter(ftj_status(cluster, "hist").get("stages") or []), {})

    cluster.create(minimal("hist"))
    wait_child(cluster, "Job", "hist-sft")
    reports = [
        {"step": 5, "totalSteps": 20, "loss": 2.0, "learningRate": 1e-4, "epoch": 0.25},
        {"step": 10, "totalSteps": 20, "loss": 1.5, "learningRate": 8e-5, "epoch": 0.5},
        {"step": 11, "totalSteps": 20, "loss": "NaN", "learningRate": None, "epoch": None},  # untrusted: no point
        {"step": 15, "totalSteps": 20, "loss": 1.2, "learningRate": 6e-5, "epoch": 0.75},
    ]
    for report in reports:
        cluster.patch_status(FTJ, "hist", {"reported": {"sft": report}})
        cluster.wait_for(lambda s=report["step"]: (sft().get("progress") or {}).get("step") == s)
    history = cluster.wait_for(lambda: (h := sft().get("history")) and len(h) == 3 and h)
    assert [(p["step"], p["loss"], p["learningRate"]) for p in history] == [
        (5, 2.0, 1e-4),
        (10, 1.5, 8e-5),
        (15, 1.2, 6e-5),
    ]
    assert sft()["progress"]["learningRate"] == 6e-5


# ------------------------------------------------------------------------------------------------ RBAC


def test_every_request_is_covered_by_the_declared_rbac(cluster: EmulatorServer, operator: OperatorThread) -> None:
    """Retry, suspend/resume, serve and scale: the operator never needs a permission outside rbac.RULES."""
    from finetune_operator.controller import rbac

    cluster.create(minimal("perm", retries=1, serve={"enabled": True, "resources": {"gpusPerNode": 1}}))
    wait_child(cluster, "Job", "perm-sft")
    fail_child(cluster, "Job", "perm-sft")
    wait_child(cluster, "Job", "perm-sft", attempt=2)
    cluster.patch(FTJ, "perm", {"spec": {"suspend": True}})
    cluster.wait_for(lambda: ch.is_suspended(cluster.get("jobs.batch", "perm-sft")))
    cluster.patch(FTJ, "perm", {"spec": {"suspend": False}})
    cluster.wait_for(lambda: not ch.is_suspended(cluster.get("jobs.batch", "perm-sft")))
    succeed(cluster, "Job", "perm-sft")
    dep = cluster.wait_for_object("deployments.apps", "perm-serve")
    harness.make_available(cluster, dep["metadata"]["name"])
    cluster.patch(FTJ, "perm", {"spec": {"serve": {"replicas": 2}}})
    cluster.wait_for(lambda: cluster.get("deployments.apps", "perm-serve")["spec"]["replicas"] == 2)
    wait_state(cluster, "perm", "Serving")
    operator.wait_reconciled("perm")  # includes a drift check (fresh reads)

    used = {
        (r.group, f"{r.resource}/{r.subresource}" if r.subresource else r.resource, r.verb)
        for r in cluster.emulator.request_log
    }
    outside = sorted(u for u in used if not rbac.allows(*u))
    assert outside == []
    for needed in [
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("batch", "jobs", "patch"),
        ("apps", "deployments", "patch"),
        ("finetune.dev", "finetunejobs/status", "patch"),
        ("finetune.dev", "finetunejobs", "patch"),
        ("", "events", "create"),
        ("", "configmaps", "create"),
    ]:
        assert needed in used, needed


class SteppedClock:
    """The reconciler's clock, held still while the test sends reports, then moved on by the test.

    Why: with the real clock, "30 reports in less than one interval" depended on how fast this machine sends
    30 PATCHes; held still, every report of the burst falls into the same interval however slow the machine.
    """

    def __init__(self) -> None:
        self.offset: float | None = None
        self.frozen_at = 0.0

    def freeze(self) -> None:
        self.frozen_at = time.time() + (self.offset or 0.0)
        self.offset = None

    def advance(self, seconds: float) -> None:
        """Run on from where it was held, ``seconds`` later."""
        self.offset = self.frozen_at + seconds - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset if self.offset is not None else self.frozen_at


def test_progress_writes_are_rate_limited(cluster: EmulatorServer) -> None:
    """A worker reporting every step must not turn into a status write per step."""
    op = harness.OperatorThread(harness.fast_config(progress_interval=1.0)).start()
    clock = SteppedClock()
    clock.advance(0)
    op.controller.reconciler.clock = clock
    try:
        cluster.create(minimal("chatty"))
        wait_child(cluster, "Job", "chatty-sft")
        cluster.wait_for(lambda: ftj_status(cluster, "chatty").get("stages"))
        before = requests(cluster, "patch", "finetunejobs", "status")
        clock.freeze()
        for step in range(1, 31):
            cluster.patch_status(FTJ, "chatty", {"reported": {"sft": {"step": step, "totalSteps": 30, "loss": 1.0}}})
        # The operator has seen the last report and looked at it (twice: a reconcile that was already running
        # when it arrived does not count) while the clock stood still ...
        cluster.wait_for(lambda: cached_step(op, "chatty") == 30)
        op.wait_reconciled("chatty", times=2)
        in_burst = requests(cluster, "patch", "finetunejobs", "status") - before
        clock.advance(1.0)  # ... and once the interval has passed, the last report lands.
        cluster.wait_for(lambda: ftj_status(cluster, "chatty").get("progress") == "30/30 (100%)", timeout=10)
        writes = requests(cluster, "patch", "finetunejobs", "status") - before
    finally:
        op.stop()
    assert in_burst <= 1, in_burst  # at most the first report of the burst; the others are coalesced
    assert writes == in_burst + 1, (in_burst, writes)


def cached_step(op: OperatorThread, name: str, namespace: str = "default") -> int | None:
    """The step of the newest report the operator's watch has delivered."""
    cached = op.controller.cache.peek(c.KIND, namespace, name) or {}
    reported = cached.get("status", {}).get("reported", {}).get("sft", {})
    step = reported.get("step")
    return step if isinstance(step, int) else None


def test_a_missing_workload_kind_is_reported_and_recovered(cluster: EmulatorServer, operator: OperatorThread) -> None:
    """pytorchjob backend without the Kubeflow training operator: say so in status and events, go on later."""
    fault = cluster.fail("create", "pytorchjobs", status=404, count=None)
    cluster.create(minimal("nokind", backend="pytorchjob"))
    status = cluster.wait_for(
        lambda: "CRD installed" in str((s := ftj_status(cluster, "nokind")).get("stages", [{}])[0].get("message")) and s
    )
    assert status["state"] == "Running" and condition(status, "Failed")["status"] == "False"
    (event,) = wait_event(cluster, "nokind", "CreateFailed")
    assert event[0] == "Warning" and "PyTorchJob" in event[2]
    cluster.emulator.faults.remove(fault)  # the training operator gets installed
    operator.resync("nokind", deep=False)  # the slow retry of a refused create (refused_interval), brought forward
    wait_child(cluster, "PyTorchJob", "nokind-sft")
    cluster.wait_for(lambda: "message" not in ftj_status(cluster, "nokind")["stages"][0])
    wait_event(cluster, "nokind", c.Reason.STAGE_STARTED)
    assert len([e for e in events(cluster, "nokind") if e[1] == "CreateFailed"]) == 1  # not one per retry


# ------------------------------------------------------------------------------------------------ watches


def test_a_child_status_change_is_acted_on_faster_than_the_resync_period(cluster: EmulatorServer) -> None:
    """With a resync period of an hour, only the watch on the workload can move the pipeline on within the
    test's timeout: disabling the child-event handler fails this test."""
    op = harness.OperatorThread(harness.fast_config(resync_interval=3600.0, drift_interval=3600.0)).start()
    try:
        cluster.create(minimal("watched"))
        wait_child(cluster, "Job", "watched-sft")
        reconciles = op.reconciles("watched")
        succeed(cluster, "Job", "watched-sft")
        status = wait_state(cluster, "watched", "Succeeded", timeout=20)
        assert status["stages"][0]["state"] == "Succeeded"
        assert op.reconciles("watched") > reconciles  # the watch event, not a timer, triggered the look
    finally:
        op.stop()
