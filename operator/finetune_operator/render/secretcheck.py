"""The Secret check: every Secret key the pipeline will use is resolved by the kubelet before anything runs.

A pod whose ``env`` names a missing Secret (or a missing key of one) is never started: the kubelet leaves it
``Pending`` with the container waiting, reason ``CreateContainerConfigError`` and a message naming the Secret.
Without a check, a missing publish or serve Secret would be noticed only after hours of training, when the
step that needs it starts.

So the first Job of the plan (download, else preflight) gets an init container, :data:`CONTAINER`, whose
environment references every Secret key any other pod of the plan references (``secretKeyRef``, never
optional; the keys that Job's own container uses are resolved for it anyway),
and whose command is ``true``: it reads nothing, prints nothing and exits at once. The kubelet resolves those
references before creating it, so a missing one stops the pipeline's first pod, and the operator (which may
list pods, never read Secrets) fails the job with reason ``SecretNotFound`` naming the spec fields (see
:mod:`finetune_operator.controller.stepping`).

The trade-off: the values pass through the environment of that one ``true`` process, in a pod that otherwise
would not hold them; it runs the same worker image that receives the tokens anyway, with the restricted
security context and no ServiceAccount token beyond the pod's own. The operator itself never gets a Secret
permission.

With ``spec.preflight.mode: Disabled`` and no download step there is no such Job: the operator's detection of
``CreateContainerConfigError`` still stops the step whose pod names the missing Secret, when that step starts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Final

#: Name of the init container.
CONTAINER: Final = "check-secrets"
#: Its environment variables: ``FT_SECRET_CHECK_<i>``, one per Secret key.
ENV_PREFIX: Final = "FT_SECRET_CHECK_"


def referenced(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(Secret, key) of every ``secretKeyRef`` in the objects (any depth), sorted, once each."""
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            ref = node.get("secretKeyRef")
            if isinstance(ref, Mapping) and ref.get("name") and ref.get("key"):
                found.add((str(ref["name"]), str(ref["key"])))
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(list(objects))
    return sorted(found)


def container(image: str, refs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The init container: every reference as a non-optional ``secretKeyRef``, command ``true``."""
    return {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["true"],
        "env": [
            {"name": f"{ENV_PREFIX}{i}", "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": False}}}
            for i, (name, key) in enumerate(refs)
        ],
        "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}, "requests": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def with_check(job: Mapping[str, Any], refs: list[tuple[str, str]]) -> dict[str, Any]:
    """A copy of a batch/v1 Job whose pod first runs the check of ``refs``."""
    out = copy.deepcopy(dict(job))
    pod = out["spec"]["template"]["spec"]
    image = pod["containers"][0]["image"]
    pod["initContainers"] = [container(image, refs), *(pod.get("initContainers") or [])]
    return out
