"""A step's pods that cannot start: the kubelet's ``CreateContainerConfigError``. Pure functions.

Why: a pod whose ``env`` names a missing Secret, or a missing key of one, is never started and never fails.
The kubelet leaves it ``Pending``, its container waiting with reason ``CreateContainerConfigError`` and a
message such as ``secret "s3" not found`` or ``couldn't find key id in Secret team-a/s3``; the workload
(Job, PyTorchJob, ...) just stays active, and the pipeline would wait forever. The operator may list pods
(read-only, never Secrets), so while a step's pods have not all started it looks at their container states,
and a Secret the kubelet cannot find fails the job for good (reason ``SecretNotFound``) with the spec fields
that name it. The first Job of the plan checks every Secret key of the plan this way before anything runs
(:mod:`finetune_operator.render.secretcheck`); for any other step the same check applies when it starts.

Which pods: those with the step's labels (the pod templates carry the FineTuneJob and stage labels); a pod
whose controller is of the workload's kind must be owned by the workload itself (its uid), so a previous
run's or attempt's pod being deleted is not taken for this one. Pods being deleted are ignored.

Other ``CreateContainerConfigError`` messages (a ConfigMap being re-created by the drift repair, a security
context the image does not satisfy) are shown in the stage's message; they do not fail the job (the kubelet
retries, and a re-created ConfigMap heals it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from finetune_operator.api import constants as c

#: The kubelet's waiting reason for a container whose configuration (env, mounts) cannot be resolved.
CONFIG_ERROR: Final = "CreateContainerConfigError"
#: Longest kubelet message kept.
MESSAGE_MAX: Final = 512
#: The kubelet's messages about Secrets (pkg/kubelet/kubelet_pods.go; the first is the API's NotFound).
_SECRET_MISSING: Final = re.compile(r'secrets? "(?P<name>[^"]{1,253})" not found')
_KEY_MISSING: Final = re.compile(
    r"couldn't find key (?P<key>\S{1,253}) in Secret (?P<ns>[^/\s]{1,63})/(?P<name>\S{1,253})"
)


@dataclass(frozen=True)
class Stuck:
    """A container the kubelet cannot create: which pod and container, and what the kubelet said."""

    pod: str
    container: str
    message: str
    #: The missing Secret (and key) when the message is about one.
    secret: str | None = None
    key: str | None = None


def selector(workload: Mapping[str, Any]) -> str:
    """The label selector of the step's pods (the labels its pod templates carry)."""
    labels = (workload.get("metadata") or {}).get("labels") or {}
    keys = (c.LABEL_MANAGED_BY, c.LABEL_JOB, c.LABEL_STAGE)
    return ",".join(f"{k}={labels[k]}" for k in keys if labels.get(k))


def _controller_ref(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return None


def of_workload(pods: Iterable[Mapping[str, Any]], workload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The pods of this very workload (not being deleted)."""
    meta = workload.get("metadata") or {}
    out = []
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        ref = _controller_ref(pod)
        if ref is not None and ref.get("kind") == workload.get("kind") and ref.get("uid") != meta.get("uid"):
            continue
        out.append(pod)
    return out


def _statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [
        s
        for key in ("initContainerStatuses", "containerStatuses")
        for s in status.get(key) or []
        if isinstance(s, Mapping)
    ]


def stuck(pods: Iterable[Mapping[str, Any]]) -> Stuck | None:
    """The first container waiting with ``CreateContainerConfigError`` (a Secret's before any other)."""
    found: list[Stuck] = []
    for pod in pods:
        name = str((pod.get("metadata") or {}).get("name") or "")
        for cs in _statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") != CONFIG_ERROR:
                continue
            message = str(waiting.get("message") or "")[:MESSAGE_MAX]
            secret = key = None
            if m := _KEY_MISSING.search(message):
                secret, key = m.group("name"), m.group("key")
            elif m := _SECRET_MISSING.search(message):
                secret = m.group("name")
            found.append(Stuck(name, str(cs.get("name") or ""), message, secret, key))
    found.sort(key=lambda s: s.secret is None)
    return found[0] if found else None


def all_started(pods: list[Mapping[str, Any]]) -> bool:
    """Whether there are pods and every one has left ``Pending`` (its containers were created)."""
    return bool(pods) and all((p.get("status") or {}).get("phase") not in (None, "", "Pending") for p in pods)
