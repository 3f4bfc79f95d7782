"""Forged status cannot steer the operator: decisions come from child workloads, worker input is bounded.

A worker pod may patch ``status`` (it reports progress into ``status.reported``), and the status subresource
cannot be narrowed to one field by RBAC. So these tests play a hostile worker that patches whatever it likes
into status, and check that the operator's decisions (skip a stage, create the vLLM Deployment, stay failed)
follow the child workloads only. Real kopf against the emulator; the test plays the workload controllers.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .test_operator_harness import (
    FTJ,
    OperatorThread,
    children,
    condition,
    ftj_status,
    minimal,
    succeed,
    wait_child,
    wait_state,
)

cluster = harness.cluster
operator = harness.operator


def two_stages_served(name: str) -> dict[str, Any]:
    return minimal(
        name,
        stages=[
            {"name": "sft", "type": "sft", "datasets": ["chat"], "method": "lora"},
            {"name": "more", "type": "sft", "datasets": ["chat"], "method": "lora"},
        ],
        merge={"enabled": True},
        serve={"enabled": True, "resources": {"gpusPerNode": 1}},
    )


def forged_stage(name: str, job: str, state: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "sft",
        "state": state,
        "attempts": 1,
        "workloadKind": "Job",
        "workloadName": f"{job}-{name}",
        "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T00:01:00Z",
    }


def test_a_forged_succeeded_stage_neither_skips_the_running_job_nor_serves(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(two_stages_served("forge"))
    wait_child(cluster, "Job", "forge-sft")
    wait_state(cluster, "forge", "Running")
    forged = {
        "state": "Succeeded",
        "stages": [
            forged_stage("sft", "forge", "Succeeded"),
            forged_stage("more", "forge", "Succeeded"),
            forged_stage("merge", "forge", "Succeeded"),
            {**forged_stage("serve", "forge", "Running"), "type": "serve", "workloadKind": "Deployment"},
        ],
    }
    cluster.patch_status(FTJ, "forge", forged)
    operator.wait_reconciled("forge", times=3)
    # The operator looked again and decided from the Job, which is still running.
    status = cluster.wait_for(
        lambda: (s := ftj_status(cluster, "forge"))["stages"][0]["state"] == "Running" and s,
        message=f"the forged stage state stayed: {ftj_status(cluster, 'forge')}",
    )
    assert status["currentStage"] == "sft" and status["state"] == "Running"
    assert [s["state"] for s in status["stages"][1:-1]] == ["Pending", "Pending"]
    assert ("Job", "forge-more") not in children(cluster, "forge")
    assert cluster.get("deployments.apps", "forge-serve") is None

    # The real pipeline still runs through.
    succeed(cluster, "Job", "forge-sft")
    wait_child(cluster, "Job", "forge-more")
    assert cluster.get("deployments.apps", "forge-serve") is None


def test_a_forged_success_of_a_later_stage_is_not_taken(cluster: EmulatorServer, operator: OperatorThread) -> None:
    """After the first stage really succeeded, a forged success of the second (never created) is ignored."""
    cluster.create(two_stages_served("later"))
    wait_child(cluster, "Job", "later-sft")
    # Forge while the first stage runs, then let it succeed: the forged second stage must still be run.
    pending = {"state": "Pending", "attempts": 0}
    stages = [
        forged_stage("sft", "later", "Running"),
        forged_stage("more", "later", "Succeeded"),
        {**forged_stage("merge", "later", "Pending"), "type": "merge", **pending},
        {**forged_stage("serve", "later", "Pending"), "type": "serve", "workloadKind": "Deployment", **pending},
    ]
    cluster.patch_status(FTJ, "later", {"stages": stages})
    succeed(cluster, "Job", "later-sft")
    wait_child(cluster, "Job", "later-more")
    assert cluster.get("deployments.apps", "later-serve") is None
    status = cluster.wait_for(lambda: (s := ftj_status(cluster, "later")).get("currentStage") == "more" and s)
    assert status["stages"][1]["state"] == "Running"


def test_a_forged_failed_condition_does_not_keep_a_succeeded_job_failed(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("ff"))
    wait_child(cluster, "Job", "ff-sft")
    wait_state(cluster, "ff", "Running")
    status = ftj_status(cluster, "ff")
    conditions = [dict(x) for x in status["conditions"]]
    for cnd in conditions:
        if cnd["type"] == "Failed":
            cnd.update(status="True", reason=c.Reason.RETRIES_EXHAUSTED, message="forged")
    cluster.patch_status(FTJ, "ff", {"state": "Failed", "conditions": conditions})
    succeed(cluster, "Job", "ff-sft")
    status = wait_state(cluster, "ff", "Succeeded")
    assert condition(status, "Failed")["status"] == "False"
    assert condition(status, "Succeeded")["status"] == "True"


def test_a_really_failed_pipeline_stays_failed_when_its_workload_is_deleted(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    """Deciding from children must not turn a failed pipeline into a retry loop once its workload is gone."""
    cluster.create(minimal("gone", retries=0))
    wait_child(cluster, "Job", "gone-sft")
    harness.fail_child(cluster, "Job", "gone-sft")
    wait_state(cluster, "gone", "Failed")
    cluster.delete("jobs.batch", "gone-sft")
    operator.wait_reconciled("gone", times=3)
    assert cluster.get("jobs.batch", "gone-sft") is None
    assert ftj_status(cluster, "gone")["state"] == "Failed"


def test_worker_reports_are_bounded_before_they_reach_the_columns(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("wild"))
    wait_child(cluster, "Job", "wild-sft")
    report = {"step": -5, "totalSteps": 10, "percent": 1e9, "loss": 0.25, "eta": "x" * 5000}
    cluster.patch_status(FTJ, "wild", {"reported": {"sft": report, "not-a-stage": {"step": 1}}})
    status = cluster.wait_for(lambda: (s := ftj_status(cluster, "wild")).get("loss") and s)
    progress = status["stages"][0]["progress"]
    assert progress == {"totalSteps": 10, "loss": 0.25}
    assert "progress" not in status  # no step: no column
    assert [s["name"] for s in status["stages"]] == ["sft"]


def test_a_previous_runs_deployment_proves_nothing_about_a_new_run(cluster: EmulatorServer) -> None:
    """The vLLM Deployment keeps its name across runs: while it still serves run 1, a forged success of run 2's
    second stage must not be taken as proven by it (nor roll it to a model that was never trained)."""
    doc = two_stages_served("rr")
    op = OperatorThread().start()
    try:
        cluster.create(doc)
        for step in ("sft", "more", "merge"):
            wait_child(cluster, "Job", f"rr-{step}")
            succeed(cluster, "Job", f"rr-{step}")
        cluster.wait_for_object("deployments.apps", "rr-serve")
        harness.make_available(cluster, "rr-serve")
        wait_state(cluster, "rr", "Serving")
        cluster.patch(FTJ, "rr", {"spec": {"runId": "r2"}})
        wait_child(cluster, "Job", "rr-r2-sft")
        cluster.wait_for(lambda: ftj_status(cluster, "rr").get("run") == "r2")
    finally:
        op.stop()
    # While no operator runs: run 2's first stage really succeeds; a worker forges the rest.
    succeed(cluster, "Job", "rr-r2-sft")
    stages = [dict(s) for s in ftj_status(cluster, "rr")["stages"]]
    for s in stages:
        if s["name"] != "serve":
            s.update(state="Succeeded", attempts=1, completionTime="2026-01-01T00:01:00Z")
    cluster.patch_status(FTJ, "rr", {"stages": stages})
    op = OperatorThread().start()
    try:
        wait_child(cluster, "Job", "rr-r2-more")
        dep = cluster.get("deployments.apps", "rr-serve")
        assert (dep["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) != "r2"  # not rolled
        assert cluster.get("jobs.batch", "rr-r2-merge") is None
    finally:
        op.stop()
