"""Reading and writing the children a FineTuneJob owns: pure functions over the backend registry.

The operator never keeps its own idea of "how a stage is doing": it reads the child's status every time
(level-based). Each workload kind reports completion differently; its backend module
(:mod:`finetune_operator.backends`) turns it into one :class:`ChildStatus` and knows where ``suspend`` lives.
This module adds the one child that is no backend, the vLLM Deployment (available = condition Available and
availableReplicas > 0; not suspended but scaled), and the REST plurals and watched resources, all derived from
the registry. Nothing here talks to the API, so every rule is covered by table-driven tests.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

from finetune_operator import backends
from finetune_operator.api import constants as c
from finetune_operator.backends.base import (
    ChildStatus as ChildStatus,
)
from finetune_operator.backends.base import (
    Phase as Phase,
)
from finetune_operator.backends.base import (
    api_group,
    api_version_only,
    cond_status,
    conditions,
    true_condition,
)

#: Annotation the operator puts on a workload it suspended because the user asked (``spec.suspend``). With
#: Kueue, a workload without it is suspended by Kueue's admission and must be left alone.
ANNOTATION_SUSPENDED_BY_USER: Final = f"{c.GROUP}/suspended-by-user"


#: (apiVersion, kind) -> REST plural. Only kinds the operator creates: its own, every backend's workload.
PLURALS: Final[dict[tuple[str, str], str]] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    # The per-job worker identity (render/identity.py).
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("apps/v1", "Deployment"): "deployments",
    **{(b.api_version, b.kind): b.plural for b in backends.REGISTRY.values()},
    (c.API_VERSION, c.KIND): c.PLURAL,
}

#: The watched child resources: (group, version, plural): every backend's workload, and the serving Deployment.
WATCHED: Final[tuple[tuple[str, str, str], ...]] = (
    *((api_group(b.api_version), api_version_only(b.api_version), b.plural) for b in backends.REGISTRY.values()),
    ("apps", "v1", "deployments"),
)


def _suspend_path(kind: Any) -> tuple[str, ...] | None:
    backend = backends.by_kind(str(kind))
    return backend.suspend_path if backend is not None else None


def is_suspended(obj: Mapping[str, Any]) -> bool:
    """Whether the workload's own suspend switch (where the renderer puts it) is on."""
    path = _suspend_path(obj.get("kind"))
    if path is None:
        return False
    value: Any = obj
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return bool(value)


def supports_suspend(obj: Mapping[str, Any]) -> bool:
    """Deployments are scaled, not suspended; every training workload kind can be suspended."""
    return _suspend_path(obj.get("kind")) is not None


def suspend_patch(obj: Mapping[str, Any], suspend: bool, *, by_user: bool | None = None) -> dict[str, Any]:
    """A JSON merge patch that sets the workload's suspend switch (and our annotation, when ``by_user`` given).

    ``by_user=None`` leaves the annotation alone; ``False`` removes it (merge patch ``null``).
    """
    path = _suspend_path(obj.get("kind"))
    if path is None:
        raise ValueError(f"{obj.get('kind')} cannot be suspended")
    patch: dict[str, Any] = {}
    node = patch
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = suspend
    if by_user is not None:
        patch["metadata"] = {"annotations": {ANNOTATION_SUSPENDED_BY_USER: "true" if by_user else None}}
    return patch


def apply_suspend(obj: dict[str, Any], suspend: bool, *, by_user: bool) -> dict[str, Any]:
    """A copy of a not-yet-created workload with its suspend switch set (used when creating it suspended)."""
    out = copy.deepcopy(obj)
    _merge(out, suspend_patch(out, suspend, by_user=by_user))
    annotations = out["metadata"].get("annotations") or {}
    out["metadata"]["annotations"] = {k: v for k, v in annotations.items() if v is not None}
    return out


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, Mapping):
            target[key] = {}
            _merge(target[key], value)
        else:
            target[key] = value


def interpret(obj: Mapping[str, Any]) -> ChildStatus:
    """Turn any child's status into a :class:`ChildStatus` (its backend's reading, or the Deployment's)."""
    kind = obj.get("kind")
    if kind == "Deployment":
        return _deployment(obj)
    backend = backends.by_kind(str(kind))
    if backend is None:
        raise ValueError(f"unsupported workload kind {kind!r}")
    return backend.interpret(obj)


def _deployment(obj: Mapping[str, Any]) -> ChildStatus:
    """Available = condition Available True and at least one available replica."""
    status = obj.get("status") or {}
    conds = conditions(obj)
    available = int(status.get("availableReplicas") or 0)
    avail_cond = true_condition(conds, "Available")
    if avail_cond is not None and available > 0:
        return ChildStatus(Phase.RUNNING, "MinimumReplicasAvailable", "", available_replicas=available)
    progressing = conds.get("Progressing") or {}
    if progressing.get("status") == "False":
        return cond_status(Phase.PENDING, progressing)
    return ChildStatus(Phase.PENDING, "", "", available_replicas=available)


def is_available(obj: Mapping[str, Any]) -> bool:
    """A Deployment that serves traffic."""
    st = interpret(obj)
    return st.phase == Phase.RUNNING and st.available_replicas > 0


def rollout_complete(obj: Mapping[str, Any]) -> bool:
    """Every replica of a Deployment runs its current template (``kubectl rollout status`` says done).

    The controller has seen the latest spec (observedGeneration), every wanted replica is updated and
    available, and no old replica is left. Until then the old pods may still be the ones answering.
    """
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    want = int((obj.get("spec") or {}).get("replicas") or 0)
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return False
    updated = int(status.get("updatedReplicas") or 0)
    return (
        updated >= want
        and int(status.get("replicas") or 0) <= updated
        and int(status.get("availableReplicas") or 0) >= want
    )


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """The controller ownerReference pointing at ``owner`` (garbage collection deletes the child with it)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", c.API_VERSION),
        "kind": owner.get("kind", c.KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def with_owner(obj: Mapping[str, Any], owner: Mapping[str, Any], *, attempt: int | None = None) -> dict[str, Any]:
    """A copy of a rendered object with namespace, our ownerReference and (for workloads) the attempt number."""
    # Only metadata changes: copy it, share the rest (rendered objects are never mutated; deep-copying pod
    # templates and ConfigMap data for every create was the operator's largest CPU cost).
    out = dict(obj)
    meta = out["metadata"] = dict(obj.get("metadata") or {})
    if "annotations" in meta:
        meta["annotations"] = dict(meta["annotations"])
    meta["namespace"] = owner["metadata"].get("namespace") or "default"
    ref = owner_reference(owner)
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != ref["uid"]]
    meta["ownerReferences"] = [*refs, ref]
    if attempt is not None:
        meta.setdefault("annotations", {})[c.ANNOTATION_ATTEMPT] = str(attempt)
    return out


def controller_owner(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The FineTuneJob ownerReference with ``controller: true``, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if (
            ref.get("kind") == c.KIND
            and str(ref.get("apiVersion", "")).startswith(c.GROUP + "/")
            and ref.get("controller")
        ):
            return ref  # type: ignore[no-any-return]
    return None


def is_ours(obj: Mapping[str, Any], owner_uid: str) -> bool:
    """Adoptable: carries our managed-by label and a controller ownerReference to this very FineTuneJob.

    A same-named object that fails this check belongs to someone else; the operator never takes it over.
    """
    labels = (obj.get("metadata") or {}).get("labels") or {}
    ref = controller_owner(obj)
    return labels.get(c.LABEL_MANAGED_BY) == c.MANAGER and ref is not None and ref.get("uid") == owner_uid


def attempt_of(obj: Mapping[str, Any]) -> int:
    """The attempt number the operator stamped on a workload (1 when missing or garbled)."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_ATTEMPT)
    try:
        return max(1, int(str(raw)))
    except (TypeError, ValueError):
        return 1
