"""Evaluation results, the promotion gate, publish records: what happens after the eval and publish steps.

Decisions that live here:

* **Where results come from** (:meth:`Gating._worker_result`): the termination message of the pod of the
  step's own batch/v1 Job (listed by the Job controller's label, kept only when the pod's controller
  ownerReference is that Job's uid), parsed and bounded by :mod:`.results`. Never ``status``: worker pods may
  patch it. A finished pod's message never changes, so it is read once per Job (cached by the Job's uid).
* **The gate** (:meth:`Gating._after_success`, rules in :mod:`finetune_operator.promotion`): decided when the
  evaluation succeeded and before the next step (publish or serve) starts. A pass lets the walk go on; a
  failure stops it there: no publish, the serving Deployment (a previous run's) untouched, ``Ready`` as it
  was, condition ``Failed`` with reason ``GateFailed`` and the values in the message, one Warning event.
  Once a later step started, the gate was passed (the operator starts it only then), so a result that can
  no longer be read (the Job expired) does not undo it; before that, an unreadable result fails the gate
  (fail closed).
* **The serving model's metric** for ``noWorseThanServing`` is the one recorded on the serving Deployment
  (annotation ``finetune.dev/metrics``, written by the operator when it created or rolled the Deployment to a
  run that passed its evaluation), while a previous run's model serves. Not ``status.outputs.metrics``: worker
  pods may patch status, and a forged baseline would let a worse model through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from finetune_operator import promotion
from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason
from finetune_operator.api.types import FineTuneJob, GateStatus, StageStatus
from finetune_operator.controller import results
from finetune_operator.controller import status as st
from finetune_operator.controller.context import Ctx
from finetune_operator.controller.serving import Serving, served_metrics
from finetune_operator.controller.stepping import Evidence
from finetune_operator.render.plan import Plan

#: Parsed results kept (by Job uid); beyond it a result is read again from its pod.
_RESULTS_MAX: Final = 4096


class Gating(Serving):
    """Reads the eval/publish results and enforces ``spec.gate``."""

    async def _worker_result(
        self, ctx: Ctx, job: FineTuneJob, workload: Mapping[str, Any] | None
    ) -> results.WorkerResult | None:
        """The result the step's pod wrote in its termination message (None when none can be read)."""
        if workload is None or workload.get("kind") != "Job":
            return None
        uid = str((workload.get("metadata") or {}).get("uid") or "")
        if not uid:
            return None
        hit: results.WorkerResult | None = self._results.get(uid)
        if hit is not None:
            self._results.move_to_end(uid)
            return hit
        name = str(workload["metadata"]["name"])
        pods = await self.kube.list("v1", "Pod", ctx.namespace, results.job_pod_selector(name))
        destinations = {
            d.name: ("huggingface" if d.huggingface else "s3" if d.s3 else "oci")
            for d in (job.spec.publish.destinations if job.spec.publish else [])
        }
        parsed = results.parse(results.termination_message(pods, uid), destinations)
        if parsed is not None:  # a finished pod's message never changes
            self._results[uid] = parsed
            while len(self._results) > _RESULTS_MAX:
                self._results.popitem(last=False)
        return parsed

    async def _later_started(self, ctx: Ctx, job: FineTuneJob, plan: Plan, i: int, evidence: Evidence) -> bool:
        """Whether a step after ``i`` started in this run (the operator starts one only after the gate passed)."""
        for j in range(i + 1, len(plan.steps)):
            found = await evidence.child(j)
            if found is None:
                continue
            if plan.steps[j].kind != "serve":
                return True
            run = ((found.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_RUN)
            if not job.spec.run_id or run == job.spec.run_id:
                return True
        return False

    async def _after_success(
        self,
        ctx: Ctx,
        job: FineTuneJob,
        plan: Plan,
        stages: list[StageStatus],
        i: int,
        evidence: Evidence,
        summary_kw: dict[str, Any],
        old_status: Mapping[str, Any],
    ) -> bool:
        """Record step ``i``'s result (eval: metrics; publish: copies); False when the gate stops the walk."""
        step, sst = plan.steps[i], stages[i]
        if step.kind not in ("eval", "publish"):
            return True
        result = await self._worker_result(ctx, job, await evidence.child(i))
        if step.kind == "publish":
            if result is not None:
                summary_kw["published"] = result.published
            return True
        if result is not None:
            sst.metrics = result.metrics or None
        summary_kw["metrics"] = sst.metrics or {}
        gate = job.spec.gate
        if gate is None:
            return True
        if await self._later_started(ctx, job, plan, i, evidence):
            # Passed when the next step started; the recorded decision is kept as it was.
            with contextlib.suppress(ValidationError):
                old_gate = old_status.get("gate")
                summary_kw["gate"] = GateStatus.model_validate(old_gate) if isinstance(old_gate, Mapping) else None
            return True
        if result is None:
            decision = promotion.Decision(
                False,
                None,
                None,
                f"the evaluation's result cannot be read from its pod (Job {step.workload['metadata']['name']}: "
                "pod gone, or no result in its termination message)",
            )
        else:
            serving = await self._serving_metrics(ctx, plan, stages, old_status)
            decision = promotion.decide(gate, result.metrics, serving)
        summary_kw["gate"] = decision.status(gate.metric)
        if decision.passed:
            return True
        message = f"promotion gate failed: {decision.message}; the model of this run is not published or served"
        summary_kw["gate_failed"] = message
        # The previous run's Deployment (if any) goes on serving its model, untouched.
        summary_kw["serving_previous"] = await self._previous_serves(ctx, plan, stages)
        old_failed = st.get_condition(old_status, c.ConditionType.FAILED) or {}
        if old_failed.get("reason") != Reason.GATE_FAILED or old_failed.get("message") != message:
            ctx.events.append(st.Event("Warning", Reason.GATE_FAILED, message))
        return False

    async def _serving_metrics(
        self, ctx: Ctx, plan: Plan, stages: list[StageStatus], old_status: Mapping[str, Any]
    ) -> dict[str, float] | None:
        """The metrics of the model serving now, recorded on its Deployment when the operator created or rolled
        it (never ``status``, which worker pods may patch); None when nothing serves or nothing was recorded."""
        return served_metrics(await self._previous_deployment(ctx, plan, stages))
