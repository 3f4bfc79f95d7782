"""Building ``status``: conditions, stage progress, the printer-column summary. Pure functions.

Conventions followed (Kubernetes API conventions, as Kubeflow's trainer does):

* every condition type in :class:`~finetune_operator.api.constants.ConditionType` is always present, with
  ``status`` True/False, a CamelCase ``reason`` from :class:`~finetune_operator.api.constants.Reason`, a
  message, ``observedGeneration``, and a ``lastTransitionTime`` that changes only when ``status`` flips (so
  ``kubectl wait`` and dashboards see real transitions, not write churn);
* ``status.state`` is one word for ``kubectl get``; ``status.progress``/``status.loss`` are strings because
  printer columns cannot format numbers;
* the operator writes everything except ``status.reported``, which belongs to the worker pods.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from finetune_operator.api.constants import ConditionType, Reason, StageState, State
from finetune_operator.api.types import GateStatus, PublishedCopy, StageProgress, StageStatus

_M = TypeVar("_M", bound=BaseModel)


def rfc3339(ts: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC with a ``Z`` (the format of Kubernetes timestamps)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond  # type: ignore[no-any-return]
    return None


def condition_true(status: Mapping[str, Any], type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> None:
    """Insert or update one condition in place; ``lastTransitionTime`` moves only when ``status`` changes."""
    value = "True" if status else "False"
    for cond in conditions:
        if cond.get("type") == type_:
            if cond.get("status") != value:
                cond["lastTransitionTime"] = now
            cond.update(status=value, reason=reason, message=message, observedGeneration=generation)
            return
    conditions.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "observedGeneration": generation,
        }
    )


# ------------------------------------------------------------------------------------------------ progress

_PROGRESS_KEYS = ("step", "totalSteps", "percent", "loss", "epoch", "eta", "learningRate", "updateTime")


def fold_progress(reported: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A worker's raw report (``status.reported.<stage>``) as ``stages[].progress``: known keys only."""
    if not isinstance(reported, Mapping):
        return None
    out = {k: reported[k] for k in _PROGRESS_KEYS if reported.get(k) is not None}
    if "percent" not in out and out.get("totalSteps") and out.get("step") is not None:
        with contextlib.suppress(TypeError, ValueError, ZeroDivisionError):
            out["percent"] = round(100.0 * float(out["step"]) / float(out["totalSteps"]), 1)
    return out or None


#: What a worker may report, per key: (types, lowest, highest) for numbers, (str, max length) for strings.
#: Worker input is untrusted: a value outside these bounds is dropped, never shown or computed with.
_REPORT_BOUNDS: dict[str, tuple[Any, ...]] = {
    "step": ((int,), 0, 2**53),
    "totalSteps": ((int,), 0, 2**53),
    "percent": ((int, float), 0.0, 100.0),
    "loss": ((int, float), -1e30, 1e30),
    "epoch": ((int, float), 0.0, 1e9),
    "learningRate": ((int, float), 0.0, 1e3),
    "eta": ((str,), 64),
    "updateTime": ((str,), 64),
}


def _in_bounds(key: str, value: Any) -> bool:
    bounds = _REPORT_BOUNDS.get(key)
    if bounds is None or isinstance(value, bool) or not isinstance(value, bounds[0]):
        return False
    if isinstance(value, str):
        return len(value) <= bounds[1] and value.isprintable()
    return bool(bounds[1] <= value <= bounds[2])


def bounded_report(reported: Any) -> dict[str, Any] | None:
    """The keys of a worker's report that have the right type and lie within bounds (None without a report)."""
    if not isinstance(reported, Mapping):
        return None
    return {str(k): v for k, v in reported.items() if _in_bounds(str(k), v)}


def typed_progress(reported: Any) -> StageProgress | None:
    """A worker's report as a :class:`StageProgress`: known keys of the right type within bounds only.

    ``status.reported`` is written by worker pods and therefore untrusted: it only ever feeds the progress
    display (``stages[].progress``, the printer columns), never a decision.
    """
    folded = fold_progress(bounded_report(reported))
    if folded is None:
        return None
    good: dict[str, Any] = {}
    for key, value in folded.items():
        try:
            StageProgress.model_validate({key: value})
        except ValidationError:
            continue
        good[key] = value
    return StageProgress.model_validate(good) if good else None


def parse_stages(raw: Any) -> list[StageStatus]:
    """``status.stages`` as models; an entry that does not parse (not written by this operator) is dropped."""
    out: list[StageStatus] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            out.append(StageStatus.model_validate(item))
        except ValidationError:
            continue
    return out


def wire(model: _M) -> dict[str, Any]:
    """A status model as the JSON the API server stores: camelCase, only the fields that were set, no nulls."""
    return model.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


#: Largest planned step count taken from the (pod-written) plan for the printer column.
_PLANNED_STEPS_MAX = 10**9


def planned_total_steps(status: Mapping[str, Any], stage: str) -> int | None:
    """The preflight plan's total steps of ``stage`` (display only: the plan is written by the preflight pod)."""
    plan = status.get("plan")
    stages = plan.get("stages") if isinstance(plan, Mapping) else None
    for entry in stages if isinstance(stages, list) else []:
        if isinstance(entry, Mapping) and entry.get("name") == stage:
            total = entry.get("totalSteps")
            if isinstance(total, int) and not isinstance(total, bool) and 0 < total <= _PLANNED_STEPS_MAX:
                return total
    return None


def format_progress(progress: Mapping[str, Any] | None) -> str | None:
    """``12/100 (12%)`` for the printer column; None without a report."""
    if not progress or progress.get("step") is None:
        return None
    step = progress["step"]
    total = progress.get("totalSteps")
    if not total:
        return str(step)
    pct = progress.get("percent")
    if pct is None:
        pct = 100.0 * float(step) / float(total)
    return f"{step}/{total} ({float(pct):.0f}%)"


def format_loss(progress: Mapping[str, Any] | None) -> str | None:
    """The loss with four significant decimals for the printer column."""
    if not progress or progress.get("loss") is None:
        return None
    try:
        return f"{float(progress['loss']):.4f}"
    except (TypeError, ValueError):
        return None


#: Status fields that only carry progress; a change confined to them may be delayed (rate limit).
PROGRESS_FIELDS = ("progress", "loss")


def strip_progress(status: Mapping[str, Any]) -> dict[str, Any]:
    """``status`` without progress-only fields: two statuses equal after this differ only in progress."""
    out = {k: v for k, v in status.items() if k not in PROGRESS_FIELDS and k != "reported"}
    stages = status.get("stages") or []
    out["stages"] = [{k: v for k, v in s.items() if k not in ("progress", "history")} for s in stages]
    return out


def only_progress_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return strip_progress(old) == strip_progress(new)


# ------------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class Summary:
    """The pipeline-level facts the conditions and ``state`` are computed from."""

    invalid: str | None = None  # the InvalidSpec message
    failed: str | None = None  # message of the terminal stage failure
    failed_reason: str = Reason.RETRIES_EXHAUSTED
    suspended: bool = False
    succeeded: bool = False  # every step before serve succeeded
    serving: bool = False  # the serve Deployment is available and its Service answered a chat completion
    #: The serve Deployment is available but its Service has not answered a chat completion: why.
    not_answering: str | None = None
    #: Appended to the Ready message while serving (e.g. why the answer check was skipped).
    serve_note: str = ""
    #: A new run (spec.runId) trains while the Deployment still serves the previous run's model.
    serving_previous: bool = False
    #: The Deployment is rolling to the new run's model (old pods may still answer).
    rolling: bool = False
    serve_enabled: bool = False
    current: str | None = None  # the running step
    current_message: str = ""
    #: The promotion gate refused this run's model (the message, with the values); the walk stopped there.
    gate_failed: str | None = None
    #: The gate's decision for this run, if it was taken.
    gate: GateStatus | None = None
    #: This run's evaluation metrics (from the evaluation pod), None without an evaluation result.
    metrics: dict[str, float] | None = None
    #: This run's published copies (from the publish pod), None without a publish result.
    published: list[PublishedCopy] | None = field(default=None)


def build_conditions(
    old: Iterable[Mapping[str, Any]], summary: Summary, *, now: str, generation: int | None
) -> list[dict[str, Any]]:
    """All five conditions from the summary (old ones are updated so transition times are kept)."""
    conds = [dict(cnd) for cnd in old]
    s = summary
    if s.invalid is not None:
        set_condition(conds, ConditionType.FAILED, True, Reason.INVALID_SPEC, s.invalid, now=now, generation=generation)
    elif s.failed is not None:
        set_condition(conds, ConditionType.FAILED, True, s.failed_reason, s.failed, now=now, generation=generation)
    elif s.gate_failed is not None:
        set_condition(
            conds, ConditionType.FAILED, True, Reason.GATE_FAILED, s.gate_failed, now=now, generation=generation
        )
    else:
        set_condition(conds, ConditionType.FAILED, False, Reason.PENDING, "", now=now, generation=generation)
    terminal = s.invalid is not None or s.failed is not None

    if s.succeeded:
        set_condition(
            conds,
            ConditionType.SUCCEEDED,
            True,
            Reason.PIPELINE_SUCCEEDED,
            "every stage succeeded",
            now=now,
            generation=generation,
        )
    elif s.gate_failed is not None and not terminal:
        set_condition(
            conds, ConditionType.SUCCEEDED, False, Reason.GATE_FAILED, s.gate_failed, now=now, generation=generation
        )
    else:
        reason = Reason.STAGE_FAILED if terminal else Reason.PENDING
        set_condition(conds, ConditionType.SUCCEEDED, False, reason, "", now=now, generation=generation)

    set_condition(
        conds,
        ConditionType.SUSPENDED,
        s.suspended and not terminal,
        Reason.SUSPENDED if s.suspended else Reason.RESUMED,
        "spec.suspend is true: the running workload is suspended" if s.suspended else "",
        now=now,
        generation=generation,
    )

    progressing = not terminal and s.gate_failed is None and not s.suspended and s.current is not None and not s.serving
    set_condition(
        conds,
        ConditionType.PROGRESSING,
        progressing,
        Reason.STAGE_RUNNING if progressing else (Reason.SERVING if s.serving else Reason.PENDING),
        s.current_message if progressing else "",
        now=now,
        generation=generation,
    )

    if s.serve_enabled and s.serving_previous and not s.serving:
        # A re-run: the endpoint keeps answering with the previous run's model until the new one is rolled out.
        ready, reason, msg = True, Reason.SERVING, "the previous run's model is served while the new run trains"
    elif s.serve_enabled:
        ready, reason = s.serving, (Reason.SERVING if s.serving else Reason.SERVE_PENDING)
        msg = "the vLLM Deployment is available" if s.serving else "waiting for training and the vLLM Deployment"
        if s.serving and s.rolling:
            msg = "the vLLM Deployment is available, rolling to the new run's model"
        elif s.serving:
            msg = (
                f"the vLLM Deployment is available{s.serve_note}"
                if s.serve_note
                else "the vLLM Deployment is available and its Service answered a chat completion"
            )
        elif s.not_answering is not None:
            reason, msg = Reason.SERVICE_NOT_ANSWERING, s.not_answering
    else:
        ready, reason = s.succeeded, (Reason.PIPELINE_SUCCEEDED if s.succeeded else Reason.PENDING)
        msg = "every stage succeeded" if s.succeeded else ""
    if terminal:
        ready, reason, msg = False, Reason.STAGE_FAILED, s.failed or s.invalid or ""
        if s.invalid is not None:
            reason = Reason.INVALID_SPEC
    elif s.gate_failed is not None and not (s.serve_enabled and (s.serving_previous or s.serving)):
        # Nothing served before this run: Ready stays False, and says why. A previous run's model that is
        # served keeps Ready as it was (the branch above: the previous model is served).
        ready, reason, msg = False, Reason.GATE_FAILED, s.gate_failed
    elif s.gate_failed is not None:
        msg = "the previous run's model is served: this run's model failed the promotion gate"
    set_condition(conds, ConditionType.READY, ready, reason, msg, now=now, generation=generation)
    order = {t: i for i, t in enumerate(ConditionType.ALL)}
    conds.sort(key=lambda cnd: order.get(str(cnd.get("type")), len(order)))
    return conds


def summary_state(summary: Summary) -> str:
    """``status.state``: Failed > Suspended > Serving > Succeeded > Running > Pending."""
    if summary.invalid is not None or summary.failed is not None or summary.gate_failed is not None:
        return State.FAILED
    if summary.suspended:
        return State.SUSPENDED
    if summary.serving:
        return State.SERVING
    if summary.succeeded and not summary.serve_enabled:
        return State.SUCCEEDED
    if summary.current is not None:
        return State.RUNNING
    return State.PENDING


# ------------------------------------------------------------------------------------------------ events

#: Reasons of a step's failure decided once and for all (no retry): its stage message starts with ``<reason>:``.
VERDICT_REASONS: Final = (Reason.WILL_NOT_FIT, Reason.INVALID_DATA, Reason.SECRET_NOT_FOUND)


def verdict_reason(message: str | None) -> str | None:
    """The verdict reason a failed stage's message starts with, if any."""
    return next((r for r in VERDICT_REASONS if (message or "").startswith(f"{r}:")), None)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the FineTuneJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for every stage transition between two statuses (derived, so a retried write posts them once)."""
    before = {s.get("name"): s for s in old.get("stages") or []}
    events: list[Event] = []
    for st in new.get("stages") or []:
        prev = before.get(st.get("name")) or {}
        was, now = prev.get("state"), st.get("state")
        attempts = st.get("attempts") or 0
        what = f"{st.get('workloadKind')} {st.get('workloadName')}"
        if was == now and (prev.get("attempts") or 0) == attempts:
            continue
        name = st.get("name")
        if now == StageState.RUNNING and (prev.get("attempts") or 0) != attempts:
            if attempts > 1:
                events.append(
                    Event("Normal", Reason.STAGE_RETRYING, f"stage {name}: created {what} (attempt {attempts})")
                )
            else:
                events.append(Event("Normal", Reason.STAGE_STARTED, f"stage {name}: created {what}"))
        elif now == StageState.SUCCEEDED:
            events.append(Event("Normal", Reason.STAGE_SUCCEEDED, f"stage {name}: {what} succeeded"))
        elif now == StageState.RETRYING:
            events.append(
                Event(
                    "Warning", Reason.STAGE_FAILED, f"stage {name}: {what} failed, retrying: {st.get('message') or ''}"
                )
            )
        elif now == StageState.FAILED:
            message = str(st.get("message") or "")
            # A verdict has its own reason (the message starts with it: preflight, a missing Secret); others
            # exhausted their retries.
            refused = verdict_reason(message)
            events.append(Event("Warning", refused or Reason.RETRIES_EXHAUSTED, f"stage {name}: {message}"))
    old_ready = condition_true(old, ConditionType.READY)
    if condition_true(new, ConditionType.READY) and not old_ready:
        cond = get_condition(new, ConditionType.READY) or {}
        endpoint = (new.get("outputs") or {}).get("endpoint")
        msg = f"serving at {endpoint}" if endpoint else str(cond.get("message") or "ready")
        events.append(Event("Normal", str(cond.get("reason") or Reason.SERVING), msg))
    return events


def merged(old: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(dict(old))
    out.update(changes)
    return out
