"""The preflight step in the operator: refusal before any GPU workload exists (WillNotFit, InvalidData), the
reason taken from the preflight Job (the exit code its controller recorded), the explanation from the pod's
report in status.plan; Warn mode; an ordinary crash of the preflight pod is retried. Real kopf against the
emulator; the test plays the Job controller and the preflight pod's status report."""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.controller import children as ch

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .test_operator_harness import (
    FTJ,
    RESOURCE,
    OperatorThread,
    condition,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

cluster = harness.cluster
operator = harness.operator

PLAN_MESSAGE = (
    "stage sft: estimated peak 153.5 GiB per GPU exceeds the 80.0 GiB of NVIDIA A100 80GB; "
    "spec.stages[0].deepspeed: {zeroStage: 3, offload: true} (per-GPU peak 16.4 GiB)"
)


def job(name: str, mode: str = "Enforce") -> dict[str, Any]:
    return minimal(name, preflight={"mode": mode})


def report(server: EmulatorServer, name: str, reason: str | None, message: str) -> None:
    """What the preflight pod writes (through the worker ServiceAccount) before it exits."""
    plan = {"stages": [{"name": "sft", "gpuMemoryGiB": 153.5, "verdict": "does not fit", "totalSteps": 900}]}
    if reason:
        plan.update(reason=reason, message=message)
    server.patch_status(FTJ, name, {"plan": plan}, "default")


def fail_by_policy(server: EmulatorServer, name: str, exit_code: int) -> None:
    """The Job controller's record of a FailJob podFailurePolicy rule."""
    message = (
        f"Container worker for pod default/{name}-abcde failed with exit code {exit_code} "
        "matching FailJob rule at index 0"
    )
    server.patch_status(RESOURCE["Job"], name, harness.player("Job").failed("PodFailurePolicy", message), "default")


def test_a_job_that_will_not_fit_fails_before_any_gpu_workload(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(job("big"))
    pre = wait_child(cluster, "Job", "big-preflight", attempt=1)
    spec = pre["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(spec["containers"][0]["resources"])
    assert spec["containers"][0]["command"][:3] == ["ftctl", "worker", "preflight"]
    assert cluster.get(RESOURCE["Job"], "big-sft", "default") is None  # nothing else before the verdict
    report(cluster, "big", c.Reason.WILL_NOT_FIT, PLAN_MESSAGE)
    fail_by_policy(cluster, "big-preflight", 12)

    status = wait_state(cluster, "big", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.WILL_NOT_FIT
    assert "153.5 GiB" in failed["message"] and "zeroStage: 3" in failed["message"]
    assert status["plan"]["stages"][0]["totalSteps"] == 900  # the pod's report stays for kubectl get -o yaml
    wait_event(cluster, "big", c.Reason.WILL_NOT_FIT)
    operator.wait_reconciled("big")
    assert cluster.get(RESOURCE["Job"], "big-sft", "default") is None  # no GPU workload, ever
    assert ch.attempt_of(cluster.get(RESOURCE["Job"], "big-preflight", "default")) == 1  # a verdict: no retry


def test_unusable_data_fails_with_invalid_data(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(job("bad"))
    wait_child(cluster, "Job", "bad-preflight", attempt=1)
    report(
        cluster,
        "bad",
        c.Reason.INVALID_DATA,
        "stage sft: no valid samples (first problem: /mnt/volumes/data/chat.jsonl:1: invalid role tag)",
    )
    fail_by_policy(cluster, "bad-preflight", 3)
    status = wait_state(cluster, "bad", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.INVALID_DATA and "chat.jsonl:1" in failed["message"]
    assert cluster.get(RESOURCE["Job"], "bad-sft", "default") is None


def test_the_reason_comes_from_the_job_not_from_the_report(cluster: EmulatorServer, operator: OperatorThread) -> None:
    """A report claiming WillNotFit does not fail a job whose preflight Job succeeded (Enforce exits non-zero);
    and a preflight pod that crashed for another reason is retried like any step."""
    cluster.create(job("crash"))
    wait_child(cluster, "Job", "crash-preflight", attempt=1)
    harness.fail_child(cluster, "Job", "crash-preflight", reason="BackoffLimitExceeded")
    wait_child(cluster, "Job", "crash-preflight", attempt=2)
    report(cluster, "crash", c.Reason.WILL_NOT_FIT, PLAN_MESSAGE)
    succeed(cluster, "Job", "crash-preflight")
    wait_child(cluster, "Job", "crash-sft", attempt=1)
    status = cluster.get(FTJ, "crash", "default")["status"]
    assert condition(status, "Failed")["status"] != "True"


def test_warn_mode_trains_anyway_with_a_warning(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(job("warned", mode="Warn"))
    wait_child(cluster, "Job", "warned-preflight", attempt=1)
    report(cluster, "warned", c.Reason.WILL_NOT_FIT, PLAN_MESSAGE)
    succeed(cluster, "Job", "warned-preflight")
    wait_child(cluster, "Job", "warned-sft", attempt=1)
    # the progress column shows the planned total steps from the start
    cluster.wait_for(lambda: harness.ftj_status(cluster, "warned").get("progress") == "0/900 (0%)", 20, "no 0/900")
    event = wait_event(cluster, "warned", c.Reason.WILL_NOT_FIT)
    assert "training anyway" in event[0][2] and "153.5 GiB" in event[0][2]


def test_disabled_mode_has_no_preflight_step(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(job("off", mode="Disabled"))
    wait_child(cluster, "Job", "off-sft", attempt=1)
    assert cluster.get(RESOURCE["Job"], "off-preflight", "default") is None
