"""Missing Secrets stop the pipeline before anything trains (real kopf against the emulated API server).

The operator has no permission on Secrets. The first Job of the plan (here the preflight) carries an init
container referencing every Secret key of the plan; the kubelet cannot create it when one is missing and
leaves the pod Pending with ``CreateContainerConfigError``, which the tests play (tests/emulator/players.py).
The operator lists the step's pods, fails the FineTuneJob with reason ``SecretNotFound`` naming the spec
fields, posts one Warning event and deletes the stuck workload; no training workload is ever created. Without
a preflight step, the same detection stops whichever step's pod names the missing Secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator.api import constants as c
from finetune_operator.controller import podstate
from finetune_operator.render import secretcheck

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .emulator.players import RESOURCE, missing_secret_message, pod_config_error, pod_of
from .test_operator_harness import (
    OperatorThread,
    children,
    condition,
    events,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

cluster = harness.cluster

PUBLISH = {
    "artifact": "adapters",
    "destinations": [
        {
            "name": "bucket",
            "s3": {
                "bucket": "models",
                "accessKeyIdSecretRef": {"name": "s3", "key": "id"},
                "secretAccessKeySecretRef": {"name": "s3", "key": "secret"},
            },
        },
        {"name": "hub", "huggingface": {"repoId": "team/tiny", "tokenSecretRef": {"name": "hub", "key": "token"}}},
    ],
}


@pytest.fixture
def operator(cluster: EmulatorServer) -> Iterator[OperatorThread]:
    """The operator, looking at pods that have not started every 0.2 s (5 s by default)."""
    op = OperatorThread(harness.fast_config(pod_check_interval=0.2)).start()
    try:
        yield op
    finally:
        op.stop()


def stuck_pod(server: EmulatorServer, kind: str, name: str, container: str, message: str) -> dict[str, Any]:
    """The workload's pod, which the kubelet cannot start (``CreateContainerConfigError`` on ``container``)."""
    owner = server.get(RESOURCE[kind], name, "default")
    assert owner is not None
    template = owner["spec"]["template"]
    created = server.create(pod_of(owner, template, f"{name}-x7k2p"))
    return server.patch_status(
        "pods", created["metadata"]["name"], pod_config_error(template["spec"], container, message)
    )


def test_preflight_checks_every_secret_of_the_plan(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("sec", preflight={"mode": "Enforce"}, publish=PUBLISH))
    pre = wait_child(cluster, "Job", "sec-preflight")
    (init,) = pre["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == secretcheck.CONTAINER and init["command"] == ["true"] and "args" not in init
    refs = sorted((e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in init["env"])
    assert refs == [("hub", "token"), ("s3", "id"), ("s3", "secret")]
    assert all(e["valueFrom"]["secretKeyRef"]["optional"] is False for e in init["env"])


def test_a_missing_publish_secret_fails_the_job_before_training(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("sec", preflight={"mode": "Enforce"}, publish=PUBLISH))
    wait_child(cluster, "Job", "sec-preflight")
    message = missing_secret_message("default", "s3", "secret", secret_exists=True)
    stuck_pod(cluster, "Job", "sec-preflight", secretcheck.CONTAINER, message)

    status = wait_state(cluster, "sec", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.SECRET_NOT_FOUND
    assert "spec.publish.destinations[0].s3.secretAccessKeySecretRef" in failed["message"]
    assert "spec.publish.destinations[0].s3.accessKeyIdSecretRef" not in failed["message"]  # that key exists
    assert message in failed["message"]  # the kubelet's own words
    (event,) = wait_event(cluster, "sec", c.Reason.SECRET_NOT_FOUND)
    assert event[0] == "Warning" and "secretAccessKeySecretRef" in event[2]

    # The stuck workload is deleted (its pod would wait forever); nothing after it was ever created.
    cluster.wait_for(lambda: cluster.get(RESOURCE["Job"], "sec-preflight", "default") is None)
    operator.wait_reconciled("sec")
    assert [
        k for k, _ in children(cluster, "sec") if k not in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding")
    ] == []
    status = harness.ftj_status(cluster, "sec")
    assert condition(status, "Failed")["reason"] == c.Reason.SECRET_NOT_FOUND  # stays, with the workload gone
    assert [s["state"] for s in status["stages"]][:2] == ["Failed", "Pending"]
    assert len([e for e in events(cluster, "sec") if e[1] == c.Reason.SECRET_NOT_FOUND]) == 1


def test_a_missing_secret_names_every_field_that_uses_it(cluster: EmulatorServer, operator: OperatorThread) -> None:
    cluster.create(minimal("nos", preflight={"mode": "Enforce"}, publish=PUBLISH))
    wait_child(cluster, "Job", "nos-preflight")
    stuck_pod(
        cluster,
        "Job",
        "nos-preflight",
        secretcheck.CONTAINER,
        missing_secret_message("default", "s3", "id", secret_exists=False),
    )
    failed = condition(wait_state(cluster, "nos", "Failed"), "Failed")
    assert failed["reason"] == c.Reason.SECRET_NOT_FOUND
    assert 'Secret "s3" does not exist' in failed["message"]
    assert "accessKeyIdSecretRef" in failed["message"] and "secretAccessKeySecretRef" in failed["message"]
    assert "tokenSecretRef" not in failed["message"]


def test_without_preflight_the_step_that_needs_the_secret_stops(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    """``preflight.mode: Disabled``: nothing checks up front; the publish step's own pod is the one the kubelet
    cannot start, and the same detection fails the job there (instead of waiting forever)."""
    cluster.create(minimal("late", publish=PUBLISH))
    wait_child(cluster, "Job", "late-sft")
    succeed(cluster, "Job", "late-sft")
    pub = wait_child(cluster, "Job", "late-publish")
    assert "initContainers" not in pub["spec"]["template"]["spec"]
    stuck_pod(
        cluster, "Job", "late-publish", "worker", missing_secret_message("default", "hub", "token", secret_exists=False)
    )
    failed = condition(wait_state(cluster, "late", "Failed"), "Failed")
    assert failed["reason"] == c.Reason.SECRET_NOT_FOUND
    assert "spec.publish.destinations[1].huggingface.tokenSecretRef" in failed["message"]
    cluster.wait_for(lambda: cluster.get(RESOURCE["Job"], "late-publish", "default") is None)


def test_other_config_errors_are_shown_not_fatal(cluster: EmulatorServer, operator: OperatorThread) -> None:
    """A ConfigMap the drift repair re-creates heals by itself: said in the stage's message, the job goes on."""
    cluster.create(minimal("cm"))
    wait_child(cluster, "Job", "cm-sft")
    stuck_pod(cluster, "Job", "cm-sft", "worker", 'configmap "cm-config" not found')
    cluster.wait_for(
        lambda: "configmap" in str((harness.ftj_status(cluster, "cm").get("stages") or [{}])[0].get("message"))
    )
    status = harness.ftj_status(cluster, "cm")
    assert status["state"] == "Running" and condition(status, "Failed").get("status") != "True"
    succeed(cluster, "Job", "cm-sft")
    wait_state(cluster, "cm", "Succeeded")


# ------------------------------------------------------------------------------------------------ pure rules


def _pod(owner_uid: str, statuses: dict[str, Any], *, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "p",
        "ownerReferences": [{"kind": "Job", "uid": owner_uid, "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": statuses}


def test_only_pods_of_this_workload_count() -> None:
    workload = {"kind": "Job", "metadata": {"uid": "u1"}}
    error = pod_config_error({"containers": [{"name": "worker"}]}, "worker", 'secret "s" not found')
    pods = [_pod("u0", error), _pod("u1", error, deleting=True)]
    assert podstate.stuck(podstate.of_workload(pods, workload)) is None
    found = podstate.stuck(podstate.of_workload([*pods, _pod("u1", error)], workload))
    assert found is not None and (found.secret, found.key, found.container) == ("s", None, "worker")


@pytest.mark.parametrize(
    ("message", "secret", "key"),
    [
        ('secret "hub" not found', "hub", None),
        ("couldn't find key token in Secret team-a/hub", "hub", "token"),
        ('configmap "x" not found', None, None),
        ("container has runAsNonRoot and image will run as root", None, None),
    ],
)
def test_kubelet_messages(message: str, secret: str | None, key: str | None) -> None:
    pod = _pod("u", pod_config_error({"containers": [{"name": "worker"}]}, "worker", message))
    found = podstate.stuck([pod])
    assert found is not None and (found.secret, found.key, found.message) == (secret, key, message)


def test_pods_that_have_started() -> None:
    assert not podstate.all_started([])
    assert not podstate.all_started([{"status": {"phase": "Pending"}}, {"status": {"phase": "Running"}}])
    assert podstate.all_started([{"status": {"phase": "Running"}}, {"status": {"phase": "Succeeded"}}])


def test_every_secret_field_is_named_and_checked_by_the_first_job() -> None:
    """The walk over the API models finds every credential field by its wire path; the first Job's check
    covers every key the other pods use (the download's own token is resolved for its own container)."""
    from finetune_operator.api.secretrefs import secret_fields
    from finetune_operator.render import render
    from finetune_operator.validation import validate

    ref = {"name": "s", "key": "k"}
    doc = minimal(
        "all",
        preflight={"mode": "Enforce"},
        publish=PUBLISH,
        tracking={
            "wandb": {"project": "p", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
            "mlflow": {
                "trackingUri": "http://mlflow:5000",
                "usernameSecretRef": {"name": "ml", "key": "user"},
                "passwordSecretRef": {"name": "ml", "key": "pw"},
            },
        },
        serve={
            "enabled": True,
            "resources": {"gpusPerNode": 1},
            "env": [{"name": "EXTRA", "valueFrom": {"secretKeyRef": ref}}],
            "apiKeySecretRef": {"name": "vllm", "key": "api-key"},
        },
    )
    doc["spec"]["model"] |= {"source": "org/tiny", "tokenSecretRef": {"name": "hf", "key": "token"}}
    job = validate(doc)
    assert sorted(p for p, _ in secret_fields(job.spec)) == sorted(
        [
            "spec.model.tokenSecretRef",
            "spec.serve.env[0].valueFrom.secretKeyRef",
            "spec.serve.apiKeySecretRef",
            "spec.tracking.wandb.apiKeySecretRef",
            "spec.tracking.mlflow.usernameSecretRef",
            "spec.tracking.mlflow.passwordSecretRef",
            "spec.publish.destinations[0].s3.accessKeyIdSecretRef",
            "spec.publish.destinations[0].s3.secretAccessKeySecretRef",
            "spec.publish.destinations[1].huggingface.tokenSecretRef",
        ]
    )
    plan = render(job)
    first = plan.steps[0]
    assert first.kind == "download"
    (init,) = first.workload["spec"]["template"]["spec"]["initContainers"]
    checked = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in init["env"]}
    everything = set(secretcheck.referenced(plan.objects()))
    assert checked == everything - {("hf", "token")} and ("hf", "token") in everything
    assert all(
        "initContainers" not in s.workload.get("spec", {}).get("template", {}).get("spec", {}) for s in plan.steps[1:]
    )
