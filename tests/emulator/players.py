"""What the controllers of the workload kinds write into their objects' status, for tests that play them.

No kube-apiserver, no Job controller, no Kubeflow or T9k controller runs here, so the tests write the statuses
those controllers would write. One table per kind, keyed by the backend registry (a backend without a player
fails tests/test_operator_harness.py::test_every_backend_has_a_player), so a new backend is played everywhere
at once. The shapes follow the upstream controllers: batch/v1 Job (``Complete``/``SuccessCriteriaMet``/
``Failed``), Kubeflow training-operator v1 (``Created``/``Running``/``Succeeded``/``Failed`` with
``PyTorchJob*`` reasons), T9k (``status.phase``), Kubeflow Trainer v2 (JobSet's conditions copied: ``Complete``
``AllJobsCompleted``, ``Failed`` ``FailedJobs``; ``jobsStatus``). Deployments (:func:`make_available`): the
status of a finished rollout, and pods that answer chat completions through their Service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_operator import backends

DONE_AT = "2026-01-01T00:10:00Z"


@dataclass(frozen=True)
class Player:
    """Statuses one workload controller writes."""

    #: The workload ran to completion.
    succeeded: Callable[[], dict[str, Any]]
    #: The workload failed for good (``reason`` is the controller's reason).
    failed: Callable[[str, str], dict[str, Any]]


def _cond(type_: str, reason: str, message: str = "", status: str = "True") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


PLAYERS: dict[str, Player] = {
    "Job": Player(
        succeeded=lambda: {
            "conditions": [
                _cond("SuccessCriteriaMet", "CompletionsReached"),
                _cond("Complete", "CompletionsReached"),
            ],
            "succeeded": 1,
            "completionTime": DONE_AT,
        },
        failed=lambda reason, message: {"conditions": [_cond("Failed", reason, message)], "failed": 1},
    ),
    "PyTorchJob": Player(
        succeeded=lambda: {
            "conditions": [
                _cond("Created", "PyTorchJobCreated"),
                _cond("Running", "PyTorchJobRunning", status="False"),
                _cond("Succeeded", "PyTorchJobSucceeded", "done"),
            ],
            "completionTime": DONE_AT,
        },
        failed=lambda reason, message: {"conditions": [_cond("Failed", reason, message)]},
    ),
    "DeepSpeedJob": Player(
        succeeded=lambda: {"phase": "Succeeded", "conditions": [{"type": "Completed", "status": "True"}]},
        failed=lambda reason, message: {"phase": "Failed", "conditions": [_cond("Failed", reason, message)]},
    ),
    "TrainJob": Player(
        succeeded=lambda: {
            "conditions": [_cond("Complete", "AllJobsCompleted", "jobset completed successfully")],
            "jobsStatus": [{"name": "node", "ready": 0, "succeeded": 1, "failed": 0, "active": 0, "suspended": 0}],
        },
        failed=lambda reason, message: {
            "conditions": [_cond("Failed", reason, message)],
            "jobsStatus": [{"name": "node", "ready": 0, "succeeded": 0, "failed": 1, "active": 0, "suspended": 0}],
        },
    ),
}

#: Resource names (as the emulator resolves them: ``plural.group``) of every kind the operator creates.
RESOURCE: dict[str, str] = {
    **{b.kind: f"{b.plural}.{b.api_version.rpartition('/')[0]}" for b in backends.REGISTRY.values()},
    "Deployment": "deployments.apps",
    "ConfigMap": "configmaps",
    "Service": "services",
    # The job's worker identity (render/identity.py).
    "ServiceAccount": "serviceaccounts",
    "Role": "roles.rbac.authorization.k8s.io",
    "RoleBinding": "rolebindings.rbac.authorization.k8s.io",
}


def deployment_status(deployment: dict[str, Any]) -> dict[str, Any]:
    """What the Deployment controller reports once every replica runs the current template and is available."""
    replicas = int((deployment.get("spec") or {}).get("replicas") or 1)
    return {
        "observedGeneration": deployment["metadata"].get("generation") or 1,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
    }


def make_available(server: Any, name: str, namespace: str = "default", *, answer: bool = True) -> dict[str, Any]:
    """Play a Deployment rolled out and available: its status, and (``answer``) its pods answering chat
    completions behind its Services like vLLM (tests/emulator/chat_backend.py) for the operator's answer check."""
    from .chat_backend import serve_deployment

    if answer:
        serve_deployment(server, name, namespace)
    dep = server.get(RESOURCE["Deployment"], name, namespace)
    result: dict[str, Any] = server.patch_status(RESOURCE["Deployment"], name, deployment_status(dep or {}), namespace)
    return result


def player(kind: str) -> Player:
    """The player of ``kind`` (KeyError naming the kind when there is none)."""
    try:
        return PLAYERS[kind]
    except KeyError:
        raise KeyError(f"no player for workload kind {kind!r}: add it to tests/emulator/players.py") from None


# ------------------------------------------------------------------------------------------ pods (kubelet)


def pod_of(owner: dict[str, Any], template: dict[str, Any], name: str) -> dict[str, Any]:
    """A pod as the workload's controller creates it: the template's labels (plus the Job controller's own
    ``job-name`` labels for a Job) and a controller ownerReference to the workload."""
    meta = owner["metadata"]
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    if owner["kind"] == "Job":
        labels |= {
            "batch.kubernetes.io/job-name": meta["name"],
            "job-name": meta["name"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
            "controller-uid": meta["uid"],
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta.get("namespace") or "default",
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def missing_secret_message(namespace: str, secret: str, key: str, *, secret_exists: bool) -> str:
    """The kubelet's message for an env ``secretKeyRef`` it cannot resolve (pkg/kubelet/kubelet_pods.go)."""
    if secret_exists:
        return f"couldn't find key {key} in Secret {namespace}/{secret}"
    return f'secret "{secret}" not found'


def pod_config_error(spec: dict[str, Any], container: str, message: str) -> dict[str, Any]:
    """A pod's status while the kubelet cannot create ``container`` (``CreateContainerConfigError``): Pending,
    init containers before it done, it and every later container waiting."""
    inits = [c["name"] for c in spec.get("initContainers") or []]
    mains = [c["name"] for c in spec.get("containers") or []]
    order = inits + mains
    at = order.index(container)

    def status(name: str, i: int) -> dict[str, Any]:
        if i < at:
            state: dict[str, Any] = {"terminated": {"exitCode": 0, "reason": "Completed"}}
        elif i == at:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
        else:
            state = {"waiting": {"reason": "PodInitializing"}}
        return {"name": name, "ready": False, "restartCount": 0, "image": "", "imageID": "", "state": state}

    out: dict[str, Any] = {"phase": "Pending"}
    if inits:
        out["initContainerStatuses"] = [status(n, i) for i, n in enumerate(inits)]
    out["containerStatuses"] = [status(n, len(inits) + i) for i, n in enumerate(mains)]
    return out
