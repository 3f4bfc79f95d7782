"""The operator and the evaluate/publish steps (real kopf against the emulated API server).

``eval`` and ``publish`` run as steps after training (their Jobs created in order, the publish credentials
only as ``secretKeyRef`` of the publish pod). Their results come from the termination message of the Job's
pod, which the tests create as the Job controller and kubelet would (:func:`finish_with_result`): metrics into
``status.stages[]``, ``status.outputs`` and the ``Metric`` column, published copies into
``status.outputs.published``; ``spec.gate`` is enforced before publish and serve.
"""

from __future__ import annotations

import json
from typing import Any

from finetune_operator.api import constants as c

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .emulator.players import RESOURCE
from .test_operator_harness import (
    OperatorThread,
    children,
    condition,
    events,
    ftj_status,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)
from .test_operator_rerun import finish_rollout

cluster = harness.cluster
operator = harness.operator

EVALUATE = {"datasets": ["chat"], "loss": True, "resources": {"gpusPerNode": 0}}
SERVE = {"enabled": True, "replicas": 1, "resources": {"gpusPerNode": 1}}
PUBLISH = {
    "artifact": "adapters",
    "destinations": [
        {
            "name": "bucket",
            "s3": {
                "bucket": "models",
                "prefix": "tiny",
                "accessKeyIdSecretRef": {"name": "s3", "key": "id"},
                "secretAccessKeySecretRef": {"name": "s3", "key": "secret"},
            },
        },
    ],
}


def job_pod(server: EmulatorServer, job: str, message: str | None, exit_code: int = 0) -> dict[str, Any]:
    """The Job's pod as the Job controller creates it, terminated as the kubelet reports it (the worker wrote
    ``message`` to its termination log)."""
    owner = server.get(RESOURCE["Job"], job, "default")
    assert owner is not None
    terminated: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "finishedAt": "2026-01-01T00:00:00Z",
    }
    if message is not None:
        terminated["message"] = message
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-abcde",
            "namespace": "default",
            "labels": {"batch.kubernetes.io/job-name": job, "job-name": job},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job,
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": "worker", "image": "worker"}], "restartPolicy": "Never"},
    }
    created = server.create(pod)
    phase = "Succeeded" if exit_code == 0 else "Failed"
    return server.patch_status(
        "pods",
        created["metadata"]["name"],
        {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": False,
                    "restartCount": 0,
                    "image": "worker",
                    "imageID": "",
                    "state": {"terminated": terminated},
                }
            ],
        },
    )


def finish_with_result(server: EmulatorServer, job: str, result: Any) -> None:
    """The worker wrote ``result`` (JSON) to its termination message and exited 0; the Job succeeded."""
    job_pod(server, job, result if isinstance(result, str) else json.dumps(result))
    succeed(server, "Job", job)


def _env(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["spec"]["template"]["spec"]["containers"][0]["env"])


def test_eval_and_publish_run_as_steps_after_training(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("evp", evaluate=EVALUATE, publish=PUBLISH))
    wait_child(cluster, "Job", "evp-sft")
    assert [n for _, n in children(cluster, "evp") if n.endswith(("-eval", "-publish"))] == []
    succeed(cluster, "Job", "evp-sft")
    ev = wait_child(cluster, "Job", "evp-eval")
    assert ev["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["ftctl", "worker", "eval"]
    assert not any("valueFrom" in e for e in _env(ev))  # no credential reaches the evaluation
    assert cluster.get(RESOURCE["Job"], "evp-publish", "default") is None  # not before the evaluation succeeded
    finish_with_result(cluster, "evp-eval", {"metrics": {"eval_loss": 1.25, "eval_runtime": 3.5}})
    pub = wait_child(cluster, "Job", "evp-publish")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _env(pub) if "valueFrom" in e}
    assert refs == {
        "FT_PUBLISH_0_ACCESS_KEY_ID": {"name": "s3", "key": "id", "optional": False},
        "FT_PUBLISH_0_SECRET_ACCESS_KEY": {"name": "s3", "key": "secret", "optional": False},
    }
    finish_with_result(
        cluster,
        "evp-publish",
        {
            "published": [
                {"name": "bucket", "type": "s3", "url": "s3://models/tiny"},
                {"name": "forged", "type": "s3", "url": "s3://elsewhere/x"},  # not a destination of the spec: dropped
            ]
        },
    )
    status = wait_state(cluster, "evp", "Succeeded")
    assert [s["name"] for s in status["stages"]] == ["sft", "eval", "publish"]
    assert all(s["state"] == "Succeeded" for s in status["stages"])
    assert status["stages"][1]["metrics"] == {"eval_loss": 1.25, "eval_runtime": 3.5}
    assert status["outputs"]["metrics"] == {"eval_loss": 1.25, "eval_runtime": 3.5}
    assert status["outputs"]["published"] == [{"name": "bucket", "type": "s3", "url": "s3://models/tiny"}]
    assert status["metric"] == "eval_loss=1.25"
    config = cluster.get(RESOURCE["ConfigMap"], "evp-config", "default")
    assert config is not None and {"eval.yaml", "publish.yaml"} <= set(config["data"])


def test_a_failing_gate_publishes_and_serves_nothing(cluster: EmulatorServer, operator: OperatorThread) -> None:
    gate = {"metric": "eval_loss", "threshold": 2.0}
    cluster.create(minimal("gated", evaluate=EVALUATE, publish=PUBLISH, gate=gate, serve=SERVE))
    wait_child(cluster, "Job", "gated-sft")
    succeed(cluster, "Job", "gated-sft")
    wait_child(cluster, "Job", "gated-eval")
    finish_with_result(cluster, "gated-eval", {"metrics": {"eval_loss": 2.5}})
    status = wait_state(cluster, "gated", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.GATE_FAILED
    assert "eval_loss 2.5 misses the threshold (at most 2)" in failed["message"]
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Ready")["reason"] == c.Reason.GATE_FAILED
    assert status["gate"] == {
        "result": "Failed",
        "metric": "eval_loss",
        "value": 2.5,
        "message": "eval_loss 2.5 misses the threshold (at most 2)",
    }
    assert status["metric"] == "eval_loss=2.5"
    assert [s["state"] for s in status["stages"]] == ["Succeeded", "Succeeded", "Pending", "Pending"]
    [warning] = wait_event(cluster, "gated", c.Reason.GATE_FAILED)
    assert warning[0] == "Warning" and "eval_loss 2.5" in warning[2]
    made = [(k, n) for k, n in children(cluster, "gated")]
    assert ("Job", "gated-eval") in made
    assert not [n for _, n in made if n.endswith(("-publish", "-serve"))]  # no publish Job, no Deployment/Service


def test_an_unreadable_or_forged_result_fails_the_gate_closed(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    gate = {"metric": "eval_loss", "threshold": 2.0}
    cluster.create(minimal("forged", evaluate=EVALUATE, publish=PUBLISH, gate=gate))
    wait_child(cluster, "Job", "forged-sft")
    succeed(cluster, "Job", "forged-sft")
    wait_child(cluster, "Job", "forged-eval")
    # A worker forging its metric in status proves nothing; a non-finite number in the message is dropped.
    cluster.patch_status(harness.FTJ, "forged", {"reported": {"eval": {"loss": 0.1}}})
    finish_with_result(cluster, "forged-eval", '{"metrics": {"eval_loss": NaN, "x y": 1}}')
    status = wait_state(cluster, "forged", "Failed")
    assert condition(status, "Failed")["reason"] == c.Reason.GATE_FAILED
    assert "did not report eval_loss" in condition(status, "Failed")["message"]
    assert cluster.get(RESOURCE["Job"], "forged-publish", "default") is None


def test_a_gate_after_the_last_step_still_ends_the_run(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("last", evaluate=EVALUATE, gate={"metric": "eval_loss", "threshold": 2.0}))
    wait_child(cluster, "Job", "last-sft")
    succeed(cluster, "Job", "last-sft")
    wait_child(cluster, "Job", "last-eval")
    finish_with_result(cluster, "last-eval", {"metrics": {"eval_loss": 3.0}})
    status = wait_state(cluster, "last", "Failed")
    assert condition(status, "Failed")["reason"] == c.Reason.GATE_FAILED
    assert condition(status, "Succeeded")["status"] == "False"
    assert "outputs" not in status  # the refused model is not reported as this job's result


def test_a_passing_gate_publishes(cluster: EmulatorServer, operator: OperatorThread) -> None:
    gate = {"metric": "eval_loss", "threshold": 2.0}
    cluster.create(minimal("passing", evaluate=EVALUATE, publish=PUBLISH, gate=gate))
    wait_child(cluster, "Job", "passing-sft")
    succeed(cluster, "Job", "passing-sft")
    wait_child(cluster, "Job", "passing-eval")
    finish_with_result(cluster, "passing-eval", {"metrics": {"eval_loss": 1.5}})
    wait_child(cluster, "Job", "passing-publish")
    finish_with_result(cluster, "passing-publish", {"published": [{"name": "bucket", "type": "s3", "url": "s3://m/t"}]})
    status = wait_state(cluster, "passing", "Succeeded")
    assert status["gate"]["result"] == "Passed" and status["gate"]["value"] == 1.5
    assert status["outputs"]["metrics"] == {"eval_loss": 1.5}
    assert condition(status, "Ready")["status"] == "True"


def _serve_run1(cluster: EmulatorServer, name: str, gate: dict[str, Any], loss: float) -> dict[str, Any]:
    """Run 1 (no runId) with eval, gate and serve, evaluated at ``loss``, up to Serving."""
    cluster.create(minimal(name, evaluate=EVALUATE, gate=gate, serve=SERVE))
    wait_child(cluster, "Job", f"{name}-sft")
    succeed(cluster, "Job", f"{name}-sft")
    wait_child(cluster, "Job", f"{name}-eval")
    finish_with_result(cluster, f"{name}-eval", {"metrics": {"eval_loss": loss}})
    cluster.wait_for_object("deployments.apps", f"{name}-serve")
    finish_rollout(cluster, f"{name}-serve")
    first = wait_state(cluster, name, "Serving")
    assert first["outputs"]["metrics"] == {"eval_loss": loss}
    return first


def _rerun(cluster: EmulatorServer, name: str, loss: float) -> None:
    """Run r2 with a changed training argument, evaluated at ``loss``."""
    stage = {**minimal()["spec"]["stages"][0], "args": {"learning_rate": 1e-5}}
    cluster.patch(harness.FTJ, name, {"spec": {"runId": "r2", "stages": [stage]}})
    wait_child(cluster, "Job", f"{name}-r2-sft")
    succeed(cluster, "Job", f"{name}-r2-sft")
    wait_child(cluster, "Job", f"{name}-r2-eval")
    finish_with_result(cluster, f"{name}-r2-eval", {"metrics": {"eval_loss": loss}})


def test_a_failing_gate_keeps_the_previous_run_serving(cluster: EmulatorServer, operator: OperatorThread) -> None:
    gate = {"metric": "eval_loss", "noWorseThanServing": True, "margin": 0.1}
    first = _serve_run1(cluster, "keep", gate, 1.0)
    endpoint = first["outputs"]["endpoint"]
    ready_since = condition(first, "Ready")["lastTransitionTime"]
    dep = cluster.get("deployments.apps", "keep-serve")

    _rerun(cluster, "keep", 1.3)  # worse than the serving 1.0 by more than the margin
    [warning] = wait_event(cluster, "keep", c.Reason.GATE_FAILED)
    assert "eval_loss 1.3 is worse than the serving model's 1 (margin 0.1)" in warning[2]
    status = wait_state(cluster, "keep", "Failed")
    assert condition(status, "Failed")["reason"] == c.Reason.GATE_FAILED
    ready = condition(status, "Ready")
    assert ready["status"] == "True" and ready["lastTransitionTime"] == ready_since
    # The previous run's model goes on serving: its outputs, metrics and the Deployment untouched.
    assert status["outputs"].get("endpoint") == endpoint, status
    assert status["outputs"]["metrics"] == {"eval_loss": 1.0}
    assert status["outputs"]["adapters"] == ["/mnt/volumes/outputs/keep/sft"]
    assert status["gate"]["result"] == "Failed" and status["gate"]["servingValue"] == 1.0
    now = cluster.get("deployments.apps", "keep-serve")
    assert now["metadata"]["resourceVersion"] == dep["metadata"]["resourceVersion"]
    assert not [e for e in events(cluster, "keep") if e[1] == c.Reason.ROLLING_OUT]


def test_a_passing_gate_rolls_the_deployment(cluster: EmulatorServer, operator: OperatorThread) -> None:
    gate = {"metric": "eval_loss", "noWorseThanServing": True, "margin": 0.1}
    _serve_run1(cluster, "roll", gate, 1.0)
    _rerun(cluster, "roll", 1.05)  # within the margin
    rolled = cluster.wait_for_object(
        "deployments.apps",
        "roll-serve",
        condition=lambda d: (d["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) == "r2",
    )
    finish_rollout(cluster, "roll-serve")
    final = cluster.wait_for(
        lambda: (s := ftj_status(cluster, "roll")).get("outputs", {}).get("metrics") == {"eval_loss": 1.05} and s
    )
    assert rolled is not None and final["state"] == "Serving" and final["run"] == "r2"
    assert final["gate"] == {
        "result": "Passed",
        "metric": "eval_loss",
        "value": 1.05,
        "servingValue": 1.0,
        "message": "eval_loss 1.05 is no worse than the serving model's 1 (margin 0.1)",
    }
    assert final["metric"] == "eval_loss=1.05"


def test_a_forged_serving_metric_in_status_does_not_move_the_gate(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    """The ``noWorseThanServing`` baseline is recorded on the Deployment (only the operator writes it), not read
    from ``status``, which worker pods may patch: a worker claiming the serving model was bad changes nothing."""
    gate = {"metric": "eval_loss", "noWorseThanServing": True, "margin": 0.1}
    _serve_run1(cluster, "forge", gate, 1.0)
    dep = cluster.get("deployments.apps", "forge-serve")
    assert json.loads(dep["metadata"]["annotations"][c.ANNOTATION_METRICS]) == {"eval_loss": 1.0}

    stage = {**minimal()["spec"]["stages"][0], "args": {"learning_rate": 1e-5}}
    cluster.patch(harness.FTJ, "forge", {"spec": {"runId": "r2", "stages": [stage]}})
    wait_child(cluster, "Job", "forge-r2-sft")
    succeed(cluster, "Job", "forge-r2-sft")
    wait_child(cluster, "Job", "forge-r2-eval")
    # A worker pod of the job (it may patch status) claims the serving model's loss was 99.
    cluster.patch_status(harness.FTJ, "forge", {"outputs": {"metrics": {"eval_loss": 99.0}}})
    finish_with_result(cluster, "forge-r2-eval", {"metrics": {"eval_loss": 1.3}})
    [warning] = wait_event(cluster, "forge", c.Reason.GATE_FAILED)
    assert "eval_loss 1.3 is worse than the serving model's 1 (margin 0.1)" in warning[2]


def test_a_rolled_deployment_records_the_new_runs_metrics(cluster: EmulatorServer, operator: OperatorThread) -> None:
    gate = {"metric": "eval_loss", "noWorseThanServing": True, "margin": 0.1}
    _serve_run1(cluster, "record", gate, 1.0)
    _rerun(cluster, "record", 0.9)
    rolled = cluster.wait_for_object(
        "deployments.apps",
        "record-serve",
        condition=lambda d: (d["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) == "r2",
    )
    assert json.loads(rolled["metadata"]["annotations"][c.ANNOTATION_METRICS]) == {"eval_loss": 0.9}
