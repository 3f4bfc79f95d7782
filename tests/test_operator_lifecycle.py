"""The operator drives whole pipelines per backend: created objects stage by stage, status, outputs, endpoint.

The expected objects come from the pure renderer (what ``ftctl render`` prints is what the operator
creates); the test plays the Job/PyTorchJob/DeepSpeedJob/Deployment controllers.
"""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import constants as c
from finetune_operator.controller.runtime import OperatorConfig, make_render, make_validate

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .emulator.players import RESOURCE
from .test_operator_harness import (
    FTJ,
    OperatorThread,
    children,
    condition,
    events,
    example,
    ftj_status,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

# Fixtures shared with the other operator test modules.
cluster = harness.cluster
operator = harness.operator


def plan_of(doc: dict[str, Any]) -> Any:
    config = OperatorConfig(allowed_image_prefixes=harness.EXAMPLE_IMAGE_PREFIXES)
    return make_render(config)(make_validate(config)(doc))


@pytest.mark.parametrize(
    ("example_name", "workload_kind"),
    [
        ("01-", "Job"),
        ("03-", "PyTorchJob"),
        ("04-", "DeepSpeedJob"),
        ("06-", "PyTorchJob"),
        ("07-", "TrainJob"),
    ],
)
def test_pipeline_runs_stage_by_stage_to_the_end(
    cluster: EmulatorServer, operator: OperatorThread, example_name: str, workload_kind: str
) -> None:
    doc = example(example_name, namespace="ml")
    name, ns = doc["metadata"]["name"], "ml"
    plan = plan_of(doc)
    assert any(s.workload["kind"] == workload_kind for s in plan.steps if s.kind == "train")
    cluster.create(doc)

    expected: list[tuple[str, str]] = [(o["kind"], o["metadata"]["name"]) for o in plan.shared]
    for step in plan.steps:
        wl = step.workload
        expected += [(o["kind"], o["metadata"]["name"]) for o in step.objects]
        if step.kind == "serve":
            cluster.wait_for_object("deployments.apps", wl["metadata"]["name"], ns)
            cluster.wait_for_object("services", step.objects[-1]["metadata"]["name"], ns)
        else:
            wait_child(cluster, wl["kind"], wl["metadata"]["name"], ns)
        # Exactly the objects of the steps so far: the next step waits for this one, nothing is duplicated.
        assert sorted(children(cluster, name, ns)) == sorted(expected), step.name
        # The status follows the child: current stage and state move with it.
        cluster.wait_for(
            lambda step=step: ftj_status(cluster, name, ns).get("currentStage") == step.name,
            message=f"currentStage never became {step.name}: {ftj_status(cluster, name, ns)}",
        )
        assert ftj_status(cluster, name, ns)["state"] == "Running"
        succeed(cluster, wl["kind"], wl["metadata"]["name"], ns)

    final_state = "Serving" if any(s.kind == "serve" for s in plan.steps) else "Succeeded"
    status = wait_state(cluster, name, final_state, ns)
    assert [s["state"] for s in status["stages"] if s["type"] != "serve"] == ["Succeeded"] * (
        len(plan.steps) - (final_state == "Serving")
    )
    assert all(s["attempts"] == 1 for s in status["stages"])
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Failed")["status"] == "False"
    assert condition(status, "Ready")["status"] == "True"
    assert status["observedGeneration"] == cluster.get(FTJ, name, ns)["metadata"]["generation"]
    outputs = status["outputs"]
    for key, value in plan.outputs.items():
        if value not in (None, [], ""):
            assert outputs[key] == value, key
    if final_state == "Serving":
        assert outputs["endpoint"] == f"http://{plan.step('serve').objects[-1]['metadata']['name']}.{ns}.svc:8000/v1"
        (serving,) = wait_event(cluster, name, c.Reason.SERVING, ns)
        assert outputs["endpoint"] in serving[2]
    # One StageStarted and one StageSucceeded event per non-serve step.
    trained = [s for s in plan.steps if s.kind != "serve"]
    wait_event(cluster, name, c.Reason.STAGE_SUCCEEDED, ns, count=len(trained))
    started = [e for e in events(cluster, name, ns) if e[1] == c.Reason.STAGE_STARTED]
    assert len(started) == len(plan.steps)

    # Every child is owned by the FineTuneJob (garbage collection) and carries our labels.
    uid = cluster.get(FTJ, name, ns)["metadata"]["uid"]
    for kind, child in children(cluster, name, ns):
        obj = cluster.get(RESOURCE[kind], child, ns)
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND,
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    # No kopf bookkeeping and no finalizer on the FineTuneJob.
    meta = cluster.get(FTJ, name, ns)["metadata"]
    assert not meta.get("finalizers")
    assert not [k for k in meta.get("annotations", {}) if k.startswith("kopf.")]
