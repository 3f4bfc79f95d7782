"""What every part of the reconciler shares: its configuration, the per-reconcile scratch, the outcomes.

The reconciler is split by decision (see :mod:`finetune_operator.controller.reconciler` for the map); the
pieces talk through the types here:

* :class:`StepOutcome`: what driving one step decided (advance, stay, retry now, failed);
* :class:`Blocked`: the step cannot proceed now (a same-named child that is not ours or being deleted);
* :class:`SpecVerdict`: the ``SpecAccepted`` condition the acceptance decision produced;
* :class:`Ctx`: the latest FineTuneJob body, the clock and the events to post after the status write.

Outcomes are enums, not strings: a misspelled outcome is a type error, not a silently unmatched branch.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from finetune_operator.api.constants import DEFAULT_WORKER_IMAGE, Reason
from finetune_operator.api.types import FineTuneJob
from finetune_operator.controller import status as st
from finetune_operator.controller.kube import Kube
from finetune_operator.render.plan import Plan

ValidateFn = Callable[[Mapping[str, Any]], FineTuneJob]
RenderFn = Callable[[FineTuneJob], Plan]


class EventSink(Protocol):
    """Posts a Kubernetes Event about ``obj`` (kopf's poster in the operator, a list in tests)."""

    def __call__(self, obj: Mapping[str, Any], type: str, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class ReconcilerConfig:
    """Tunables; the defaults suit a cluster, tests shrink them."""

    #: Minimum seconds between two status writes that only change progress (step, loss) of one job.
    progress_interval: float = 10.0
    #: Seconds to wait before looking again at a child that is being deleted or is not ours.
    wait_interval: float = 5.0
    #: Seconds before trying again a step whose objects the API server refused (4xx: kind missing, quota).
    refused_interval: float = 30.0
    #: Times a reconcile is recomputed after a status write conflict before giving up (then backoff).
    conflict_retries: int = 8
    #: Seconds one chat completion through the vLLM Service may take (the answer check, :mod:`.answering`).
    answer_timeout: float = 30.0
    #: First delay before a failed answer check is repeated; doubled per failure up to ``answer_retry_max``.
    answer_retry_initial: float = 2.0
    answer_retry_max: float = 60.0
    #: Image of the answer Job (``ftctl worker answer``) of FineTuneJobs without ``spec.image``.
    worker_image: str = DEFAULT_WORKER_IMAGE
    #: Seconds between looks at the pods of a step that have not started (pods are not watched): a pod
    #: waiting for a missing Secret fails the job. The wait grows with the step's age, up to 5 minutes.
    pod_check_interval: float = 5.0


class StepOutcome(enum.Enum):
    """What driving one download/train/merge step decided."""

    #: The step succeeded: go on with the next one in the same reconcile.
    ADVANCE = "advance"
    #: The step is running (or suspended): wait for its next event.
    STAY = "stay"
    #: A retry was recorded: reconcile again at once to act on it (delete and re-create the workload).
    RETRY_NOW = "retry-now"
    #: Out of retries: the pipeline fails.
    FAILED = "failed"


@dataclass(frozen=True)
class SpecVerdict:
    """The ``SpecAccepted`` condition: whether the current spec is what the pipeline runs, and why not."""

    accepted: bool = True
    reason: str = Reason.ACCEPTED
    message: str = ""


class Blocked(Exception):
    """The step cannot proceed now (a same-named child being deleted, or one that is not ours)."""

    def __init__(self, message: str, *, warn: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.warn = warn
        self.retry_after = retry_after


class Ctx:
    """Per-reconcile scratch: the latest FineTuneJob body, the clock, and events to post after the write."""

    def __init__(self, ftj: dict[str, Any], now: float) -> None:
        self.ftj = ftj
        self.now = now
        self.stamp = st.rfc3339(now)
        self.events: list[st.Event] = []
        self.requeue: float | None = None
        #: The Failed condition's reason when a step decided it (the preflight step: WillNotFit, InvalidData).
        self.failed_reason: str | None = None

    @property
    def namespace(self) -> str:
        return str(self.ftj["metadata"].get("namespace") or "default")

    @property
    def name(self) -> str:
        return str(self.ftj["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.ftj["metadata"].get("uid") or "")

    @property
    def generation(self) -> int | None:
        gen = self.ftj["metadata"].get("generation")
        return int(gen) if gen is not None else None

    def requeue_after(self, delay: float) -> None:
        self.requeue = delay if self.requeue is None else min(self.requeue, delay)


def clean(value: Any) -> Any:
    """Drop ``None`` values from dicts (recursively): a structural schema rejects nulls, and merge patch
    would read a null as "delete this field"."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def with_deletions(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new``: keys of nested objects that disappeared become ``null``
    (a merge patch merges objects, so a key simply left out would stay, e.g. a withdrawn endpoint)."""
    out = dict(new)
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, Mapping):
            out[key] = with_deletions(before, value)
            out[key].update({k: None for k in before if k not in value})
    return out


def parse_time(value: Any) -> float | None:
    """An RFC 3339 timestamp as seconds since the epoch; None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Base:
    """The reconciler's collaborators and caches (everything here may be lost: it is rebuilt from the cluster).

    The decision modules are layered classes on top of this one, each adding the methods of one decision:
    :class:`~.writing.StatusWriter` → :class:`~.accepting.Accepting` → :class:`~.stepping.Stepping` →
    :class:`~.serving.Serving` → :class:`~.reconciler.Reconciler`; a layer calls only itself and the ones
    below it.
    """

    def __init__(
        self,
        kube: Kube,
        *,
        validate: ValidateFn,
        render: RenderFn,
        events: EventSink,
        config: ReconcilerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.validate = validate
        self.render = render
        self.events = events
        self.config = config or ReconcilerConfig()
        self.clock = clock
        #: uid -> time of the last status write (progress rate limit).
        self._last_write: dict[str, float] = {}
        #: (kind, namespace, name) -> resourceVersion our last write produced: its watch event needs no
        #: reconcile (this halves the API traffic of a pipeline; a missed skip only costs a no-op reconcile).
        #: Bounded (oldest entries dropped) so that deleted jobs' children do not accumulate.
        self.own_versions: OrderedDict[tuple[str, str, str], tuple[str, ...]] = OrderedDict()
        self._validated: OrderedDict[tuple[Any, ...], FineTuneJob | Exception] = OrderedDict()
        self._plans: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()
        #: Eval/publish workers' parsed results by Job uid (see :mod:`.gating`).
        self._results: OrderedDict[str, Any] = OrderedDict()
        #: (namespace, name) -> status.state, for the jobs-by-state gauge.
        self.states: dict[tuple[str, str], str] = {}
        #: Failed answer checks by rollout (``answered`` annotation value, see :mod:`.answering`): consecutive
        #: failures, the time before which no new check is sent (backoff), and the last failure's detail.
        #: Lost on a restart, which only restarts the backoff.
        self._answer_failures: OrderedDict[str, tuple[int, float, str]] = OrderedDict()
