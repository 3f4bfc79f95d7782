"""The operator and the evaluate/publish steps (real kopf against the emulated API server).

What this release's operator does with them: ``eval`` and ``publish`` run as ordinary steps after training
(their Jobs created in order, the publish credentials only as ``secretKeyRef`` of the publish pod), and a job
with ``spec.gate`` is refused with ``InvalidSpec`` on ``spec.gate``: the operator does not enforce the gate yet,
and refusing is the side that never serves or publishes an ungated model.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .emulator.players import RESOURCE
from .test_operator_harness import (
    OperatorThread,
    children,
    condition,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

cluster = harness.cluster
operator = harness.operator

EVALUATE = {"datasets": ["chat"], "loss": True, "resources": {"gpusPerNode": 0}}
PUBLISH = {
    "artifact": "adapters",
    "destinations": [
        {"name": "bucket", "s3": {"bucket": "models", "prefix": "tiny",
                                  "accessKeyIdSecretRef": {"name": "s3", "key": "id"},
                                  "secretAccessKeySecretRef": {"name": "s3", "key": "secret"}}},
    ],
}


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
    succeed(cluster, "Job", "evp-eval")
    pub = wait_child(cluster, "Job", "evp-publish")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _env(pub) if "valueFrom" in e}
    assert refs == {"FT_PUBLISH_0_ACCESS_KEY_ID": {"name": "s3", "key": "id", "optional": False},
                    "FT_PUBLISH_0_SECRET_ACCESS_KEY": {"name": "s3", "key": "secret", "optional": False}}
    succeed(cluster, "Job", "evp-publish")
    status = wait_state(cluster, "evp", "Succeeded")
    assert [s["name"] for s in status["stages"]] == ["sft", "eval", "publish"]
    assert all(s["state"] == "Succeeded" for s in status["stages"])
    config = cluster.get(RESOURCE["ConfigMap"], "evp-config", "default")
    assert config is not None and {"eval.yaml", "publish.yaml"} <= set(config["data"])


def test_a_gate_is_refused_until_the_operator_enforces_it(cluster: EmulatorServer, operator: OperatorThread) -> None:
    gate = {"metric": "eval_loss", "threshold": 2.0}
    cluster.create(minimal("gated", evaluate=EVALUATE, publish=PUBLISH, gate=gate))
    status = wait_state(cluster, "gated", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.INVALID_SPEC
    assert "spec.gate: the promotion gate is enforced by `ftctl run --local` only" in failed["message"]
    wait_event(cluster, "gated", c.Reason.INVALID_SPEC)
    assert children(cluster, "gated") == []
