"""The interface every training backend implements, and the pieces its modules share.

A *backend* is a workload kind that runs one training stage (``spec.backend``). Everything the rest of the code
needs to know about a kind is answered by one :class:`Backend` object:

* what it is: ``api_version``, ``kind``, ``plural`` (the operator's REST paths, watches and RBAC);
* :meth:`Backend.build`: the objects of one stage (the workload, and e.g. the headless Service of an Indexed
  Job), built from the shared pod template of :mod:`finetune_operator.render.pods`;
* ``suspend_path``: where the boolean that suspends it lives (Job ``spec.suspend``, DeepSpeedJob's pause mode);
* :meth:`Backend.interpret`: its status as one :class:`ChildStatus` (running/succeeded/failed, reason, message);
* ``rules``: the RBAC rules the operator needs for it (generated into the chart);
* :meth:`Backend.plan_launch`: how the worker turns the environment its pods get into LLaMA-Factory's
  launcher variables (:mod:`finetune_operator.backends.launch`).

Why one object per kind: before, "backend" was spelled out in the API types, the renderer, the status
interpreter, the REST plurals, the watches, RBAC, the worker's environment mapping and the test harness; adding a
kind was a tour of the codebase and forgetting one place was only noticed on a cluster. The registry
(:mod:`finetune_operator.backends`) is the one list those places now read. Everything here is pure: no API
calls, no kopf, no torch (the import-linter contract covers this package).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from finetune_operator.backends.launch import Launch
from finetune_operator.render.plan import StageInput as StageInput


class Phase:
    """What a child is doing, whatever its kind."""

    PENDING: Final = "Pending"
    RUNNING: Final = "Running"
    SUSPENDED: Final = "Suspended"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"


@dataclass(frozen=True)
class ChildStatus:
    """The interpretation of one child's status."""

    phase: str
    #: The child's own reason (``BackoffLimitExceeded``, ``PyTorchJobFailed`` ...), empty when none.
    reason: str = ""
    message: str = ""
    #: The workload's suspend flag is set (by us, or by Kueue while it waits for admission).
    suspended: bool = False
    #: Deployments: ready replicas.
    available_replicas: int = 0


@dataclass(frozen=True)
class Rule:
    """One RBAC rule with the reason it is needed (the reason becomes a comment in the generated chart)."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    reason: str
    resource_names: tuple[str, ...] = ()

    def to_k8s(self) -> dict[str, Any]:
        """The rule as a ``rules[]`` entry of a Role/ClusterRole."""
        out: dict[str, Any] = {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if self.resource_names:
            out["resourceNames"] = list(self.resource_names)
        return out


#: What every workload backend needs: watch (label-selected) to follow it, get to adopt after a lost create
#: response, create, patch to suspend and resume, delete to retry a failed stage and to stop an unfinished run.
WORKLOAD_VERBS: Final = ("get", "list", "watch", "create", "patch", "delete")


class Backend(Protocol):
    """One training workload kind. Implementations are module-level singletons registered in
    :data:`finetune_operator.backends.REGISTRY`."""

    @property
    def name(self) -> str:
        """``spec.backend`` value."""

    @property
    def api_version(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def plural(self) -> str:
        """REST resource name (lower-case plural)."""

    @property
    def suspend_path(self) -> tuple[str, ...]:
        """Path of the boolean that suspends the workload (set true/false to suspend/resume)."""

    @property
    def kueue(self) -> bool:
        """Whether Kueue can admit this kind (then a queue name creates it suspended with Kueue's label)."""

    @property
    def targets(self) -> str:
        """Upstream release or API this backend is written against (shown in the docs' backends table)."""

    def build(self, inp: StageInput) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The objects of one training stage in creation order, and which of them is the workload."""
        ...

    def interpret(self, obj: Mapping[str, Any]) -> ChildStatus:
        """The workload's status as a :class:`ChildStatus`."""
        ...

    def rules(self) -> tuple[Rule, ...]:
        """RBAC rules the operator needs for this backend (its workload, and anything else it creates)."""
        ...

    def plan_launch(self, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
        """How the worker launches LLaMA-Factory from the environment this kind gives its pods."""
        ...


def api_group(api_version: str) -> str:
    """``batch`` of ``batch/v1``; ``""`` (the core group) of ``v1``."""
    return api_version.rpartition("/")[0]


def api_version_only(api_version: str) -> str:
    """``v1`` of ``batch/v1``."""
    return api_version.rpartition("/")[2]


def workload_rule(backend: Backend, reason: str) -> Rule:
    """The standard rule for a backend's workload resource."""
    return Rule((api_group(backend.api_version),), (backend.plural,), WORKLOAD_VERBS, reason)


# ------------------------------------------------------------------------------------------ status helpers


def conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The object's conditions by type (the last one of a type wins)."""
    out: dict[str, Mapping[str, Any]] = {}
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and "type" in cond:
            out[str(cond["type"])] = cond
    return out


def true_condition(conds: Mapping[str, Mapping[str, Any]], *types: str) -> Mapping[str, Any] | None:
    """The first of ``types`` whose condition is ``True``."""
    for t in types:
        cond = conds.get(t)
        if cond is not None and cond.get("status") == "True":
            return cond
    return None


def cond_status(phase: str, cond: Mapping[str, Any], *, suspended: bool = False) -> ChildStatus:
    """A :class:`ChildStatus` carrying a condition's reason and message."""
    return ChildStatus(phase, str(cond.get("reason") or ""), str(cond.get("message") or ""), suspended)


@dataclass(frozen=True)
class ConditionKinds:
    """Which condition types of a workload mean what, for kinds whose controller reports only conditions."""

    succeeded: tuple[str, ...]
    running: tuple[str, ...]
    failed: tuple[str, ...] = ("Failed",)
    suspended: tuple[str, ...] = ("Suspended",)


def by_conditions(obj: Mapping[str, Any], suspend_path: tuple[str, ...], kinds: ConditionKinds) -> ChildStatus:
    """A workload's phase from its conditions, in the order that matters: a finished workload is finished even
    if suspended; a suspended one (by its condition, or by the flag we or Kueue set) is not running."""
    conds = conditions(obj)
    suspended = bool(read_path(obj, suspend_path))
    if (done := true_condition(conds, *kinds.succeeded)) is not None:
        return cond_status(Phase.SUCCEEDED, done)
    if (failed := true_condition(conds, *kinds.failed)) is not None:
        return cond_status(Phase.FAILED, failed)
    susp = true_condition(conds, *kinds.suspended)
    if suspended or susp is not None:
        return cond_status(Phase.SUSPENDED, susp or {}, suspended=suspended)
    if (running := true_condition(conds, *kinds.running)) is not None:
        return cond_status(Phase.RUNNING, running)
    return ChildStatus(Phase.PENDING)


def read_path(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` (None when any step is missing)."""
    value: Any = obj
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value
