"""Writing status: composing ``status`` from the API models, writing it, posting the events it implies.

Decisions that live here:

* **What status says** (:meth:`StatusWriter._compose`): the conditions and ``state`` from the pipeline
  :class:`~finetune_operator.controller.status.Summary`, the printer columns from the current stage's
  progress, and which ``outputs`` answer (the new run's once it serves, the previous run's until then).
  Status is a :class:`~finetune_operator.api.types.FineTuneJobStatus`; it becomes JSON in one place
  (:func:`~finetune_operator.controller.status.wire`), so a misspelled field is an error here instead of a
  field a real API server silently prunes.
* **When to write** (:meth:`StatusWriter._write`): only when something changed, progress-only changes at
  most every ``progress_interval``, always with the resourceVersion the status was computed from
  (optimistic concurrency; a 409 makes the reconciler recompute).
* **Which watch events are our own echo** (:meth:`StatusWriter.is_own_version`).
* **Events** are derived from the old and the new status (:func:`~.status.transition_events`), and posted
  after the write, so a retried write does not post them twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason, StageState
from finetune_operator.api.types import Condition, FineTuneJob, FineTuneJobStatus, Outputs, StageStatus
from finetune_operator.controller import metrics, results
from finetune_operator.controller import status as st
from finetune_operator.controller.context import Base, Ctx, SpecVerdict, clean, parse_time, with_deletions
from finetune_operator.render.plan import Plan

log = logging.getLogger(__name__)

_OWN_VERSIONS_MAX: Final = 20_000
#: Top-level status fields a new status may drop: they must be nulled in the patch (a merge patch keeps them).
_REMOVABLE: Final = ("outputs", "progress", "loss", "currentStage", "metric", "gate")


def _conditions(raw: list[dict[str, Any]]) -> list[Condition]:
    return [Condition.model_validate(cnd) for cnd in raw]


class StatusWriter(Base):
    """Composes and writes ``status``; remembers our own writes and the jobs' states."""

    def forget(self, namespace: str, name: str) -> None:
        self.own_versions.pop((c.KIND, namespace, name), None)
        self.states.pop((namespace, name), None)

    def _compose(
        self,
        ctx: Ctx,
        job: FineTuneJob,
        plan: Plan,
        stages: list[StageStatus],
        summary: st.Summary,
        old_status: Mapping[str, Any],
        verdict: SpecVerdict,
    ) -> dict[str, Any]:
        """The whole status of a reconcile that drove the plan (as the JSON to write)."""
        generation = ctx.generation
        conditions = st.build_conditions(
            old_status.get("conditions") or [], summary, now=ctx.stamp, generation=generation
        )
        st.set_condition(
            conditions,
            c.ConditionType.SPEC_ACCEPTED,
            verdict.accepted,
            verdict.reason,
            verdict.message,
            now=ctx.stamp,
            generation=generation,
        )
        old_spec = st.get_condition(old_status, c.ConditionType.SPEC_ACCEPTED)
        if not verdict.accepted and (old_spec is None or old_spec.get("message") != verdict.message):
            ctx.events.append(st.Event("Warning", verdict.reason, verdict.message))

        # Progress columns: the current stage's report, else the latest stage that reported.
        upto = (
            len(stages)
            if summary.current is None
            else next((i + 1 for i, s in enumerate(plan.steps) if s.name == summary.current), len(stages))
        )
        progress = next((s.progress for s in reversed(stages[:upto]) if s.progress is not None), None)
        columns = st.wire(progress) if progress is not None else None
        # A training stage that has not reported yet shows the preflight plan's total from the start.
        current = next((i for i, s in enumerate(plan.steps) if s.name == summary.current), None)
        if current is not None and plan.steps[current].kind == "train" and stages[current].progress is None:
            planned = st.planned_total_steps(old_status, plan.steps[current].name)
            if planned is not None:
                columns = {"step": 0, "totalSteps": planned, "percent": 0.0}

        outputs: Outputs | None = None
        # While the Deployment rolls, the previous run's outputs (if any) are what answers.
        if summary.succeeded and not (summary.rolling and old_status.get("outputs")):
            found = {k: v for k, v in plan.outputs.items() if k != "endpoint" and v not in (None, [], "")}
            if summary.serving and plan.outputs.get("endpoint"):
                found["endpoint"] = plan.outputs["endpoint"]
            outputs = Outputs.model_validate(found)
            if summary.metrics:
                outputs.metrics = dict(summary.metrics)
            old_outputs = old_status.get("outputs") or {}
            if summary.published is not None:
                outputs.published = list(summary.published)
            elif old_outputs.get("published") and (
                old_outputs.get("model"),
                old_outputs.get("adapters") or [],
            ) == (outputs.model, outputs.adapters):
                # The publish pod is gone (its Job expired): what the operator recorded for this model stands.
                outputs.published = Outputs.model_validate({"published": old_outputs["published"]}).published
        elif old_status.get("outputs"):
            # A new run is under way (training, or the Deployment rolling to its model): the previous run's
            # results are still what exists and what answers; they switch once the new model serves.
            outputs = Outputs.model_validate(old_status["outputs"])
            if not (summary.serving or summary.serving_previous):
                outputs.endpoint = None
        current_stage = summary.current or (plan.steps[-1].name if summary.succeeded and plan.steps else None)
        status = FineTuneJobStatus(
            observed_generation=generation,
            run=job.spec.run_id,
            state=st.summary_state(summary),
            current_stage=current_stage,
            progress=st.format_progress(columns),
            loss=st.format_loss(columns),
            conditions=_conditions(conditions),
            stages=stages,
            outputs=outputs,
            metric=results.metric_column(
                summary.metrics or (outputs.metrics if outputs is not None else None) or {},
                job.spec.gate.metric if job.spec.gate else None,
            ),
            gate=summary.gate,
        )
        self._observe_durations(old_status, stages)
        return st.wire(status)

    def _observe_durations(self, old_status: Mapping[str, Any], stages: list[StageStatus]) -> None:
        before = {s.get("name"): s.get("state") for s in old_status.get("stages") or []}
        for sst in stages:
            if sst.state == StageState.SUCCEEDED and before.get(sst.name) != StageState.SUCCEEDED:
                start, end = parse_time(sst.start_time), parse_time(sst.completion_time)
                if start is not None and end is not None and end >= start:
                    metrics.STAGE_DURATION.labels(type=sst.type).observe(end - start)

    async def _invalid(self, ctx: Ctx, message: str) -> float | None:
        """An invalid spec: condition Failed/InvalidSpec with the whole message, a Warning event, no children."""
        old_status: dict[str, Any] = ctx.ftj.get("status") or {}
        generation = ctx.generation
        summary = st.Summary(invalid=message)
        conditions = st.build_conditions(
            old_status.get("conditions") or [], summary, now=ctx.stamp, generation=generation
        )
        st.set_condition(
            conditions,
            c.ConditionType.SPEC_ACCEPTED,
            False,
            Reason.INVALID_SPEC,
            message,
            now=ctx.stamp,
            generation=generation,
        )
        status = FineTuneJobStatus(
            observed_generation=generation,
            state=c.State.FAILED,
            conditions=_conditions(conditions),
            stages=st.parse_stages(old_status.get("stages")),
            current_stage=old_status.get("currentStage"),
        )
        old_failed = st.get_condition(old_status, c.ConditionType.FAILED) or {}
        if old_failed.get("reason") != Reason.INVALID_SPEC or old_failed.get("message") != message:
            ctx.events.append(st.Event("Warning", Reason.INVALID_SPEC, message))
        await self._write(ctx, old_status, st.wire(status))
        return None

    async def _write(self, ctx: Ctx, old_status: Mapping[str, Any], new_status: dict[str, Any]) -> None:
        """Write ``status`` if it changed (progress-only changes at most every ``progress_interval``)."""
        key = (ctx.namespace, ctx.name)
        new_status = clean(new_status)
        self.states[key] = str(new_status.get("state") or c.State.PENDING)
        old_cmp = clean({k: old_status.get(k) for k in new_status})
        removed = [k for k in _REMOVABLE if k in old_status and k not in new_status]
        if old_cmp == new_status and not removed:
            self._post(ctx)
            return
        if st.only_progress_changed(old_cmp, new_status) and not removed and not ctx.events:
            last = self._last_write.get(ctx.uid, 0.0)
            wait = last + self.config.progress_interval - ctx.now
            if wait > 0:
                ctx.requeue_after(wait)
                return
        patch: dict[str, Any] = {"metadata": {"resourceVersion": ctx.ftj["metadata"].get("resourceVersion")}}
        patch["status"] = with_deletions(old_cmp, {**new_status, **dict.fromkeys(removed)})
        updated = await self.kube.patch(c.API_VERSION, c.KIND, ctx.namespace, ctx.name, patch, subresource="status")
        ctx.ftj = updated
        self._last_write[ctx.uid] = ctx.now
        self._note_own_write(ctx)
        ctx.events[:0] = st.transition_events(old_status, new_status)
        self._post(ctx)

    def _note_own_write(self, ctx: Ctx, obj: Mapping[str, Any] | None = None) -> None:
        body = ctx.ftj if obj is None else obj
        meta = body.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if rv:
            key = (str(body.get("kind") or c.KIND), ctx.namespace, str(meta.get("name")))
            self.own_versions[key] = (*self.own_versions.get(key, ())[-3:], str(rv))
            self.own_versions.move_to_end(key)
            while len(self.own_versions) > _OWN_VERSIONS_MAX:
                self.own_versions.popitem(last=False)

    def is_own_version(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` (from a watch event) is exactly what one of our last writes to it produced (the
        last few are kept: under load the echo of a write often arrives after the next write)."""
        meta = obj.get("metadata") or {}
        key = (str(obj.get("kind")), str(meta.get("namespace") or "default"), str(meta.get("name")))
        rv = meta.get("resourceVersion")
        return rv is not None and str(rv) in self.own_versions.get(key, ())

    def _post(self, ctx: Ctx) -> None:
        for event in ctx.events:
            try:
                self.events(ctx.ftj, event.type, event.reason, event.message[:1000])
            except Exception:
                log.warning("could not post event %s for %s/%s", event.reason, ctx.namespace, ctx.name, exc_info=True)
        ctx.events.clear()
