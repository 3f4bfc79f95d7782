"""Serving: the vLLM Deployment and Service after training, scaling, suspending and rolling to a new run.

Decisions that live here:

* **Ensure** the Deployment and Service exist and are ours (:meth:`Serving._serve`); a missing one is
  re-created (drift), one that is not ours blocks the step.
* **Scale** to ``serve.replicas``, or to 0 while ``spec.suspend`` (the GPUs are what suspending frees).
* **Roll** the existing Deployment to a new run's model by patching its pod template
  (:meth:`Serving._roll`): the same object keeps answering until a new pod is ready.
* **Serving the previous run** while a new one trains (:meth:`Serving._serving_previous`): Ready and the
  endpoint stay.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason, StageState
from finetune_operator.api.types import FineTuneJob, StageStatus
from finetune_operator.controller import children as ch
from finetune_operator.controller import status as st
from finetune_operator.controller.context import Blocked, Ctx, with_deletions
from finetune_operator.controller.stepping import Stepping
from finetune_operator.render.plan import Plan, Step


def metrics_annotation(metrics: Mapping[str, float] | None) -> dict[str, str]:
    """The Deployment annotation recording the served model's metrics (empty without metrics)."""
    if not metrics:
        return {}
    return {c.ANNOTATION_METRICS: json.dumps(dict(metrics), sort_keys=True, separators=(",", ":"))}


def served_metrics(deployment: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The metrics recorded on a Deployment (finite numbers only); None when it records none."""
    raw = ((deployment or {}).get("metadata") or {}).get("annotations", {}).get(c.ANNOTATION_METRICS)
    try:
        doc = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    out = {
        str(k): float(v)
        for k, v in doc.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    return out or None


class Serving(Stepping):
    """Runs the serve step."""

    async def _serving_previous(self, ctx: Ctx, job: FineTuneJob, plan: Plan, stages: list[StageStatus]) -> bool:
        """Whether a re-run trains while the Deployment still serves the previous run's model.

        A new run keeps the serve stage's status (it was started) and resets the others, so "serve started,
        an earlier step not done" means exactly that. The Ready condition and the endpoint then stay.
        """
        idx = next((i for i, s in enumerate(plan.steps) if s.kind == "serve"), None)
        if idx is None or stages[idx].attempts == 0:
            return False
        if all(s.state == StageState.SUCCEEDED for s in stages[:idx]):
            return False
        return await self._previous_serves(ctx, plan, stages)

    async def _previous_serves(self, ctx: Ctx, plan: Plan, stages: list[StageStatus]) -> bool:
        """Whether the Deployment of an earlier serve (kept across runs) is ours, scaled up and available."""
        return await self._previous_deployment(ctx, plan, stages) is not None

    async def _previous_deployment(self, ctx: Ctx, plan: Plan, stages: list[StageStatus]) -> dict[str, Any] | None:
        """The Deployment of an earlier serve when it is ours, scaled up and available; None otherwise."""
        idx = next((i for i, s in enumerate(plan.steps) if s.kind == "serve"), None)
        if idx is None or stages[idx].attempts == 0:
            return None
        wl = plan.steps[idx].workload
        dep = await self.kube.get(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
        if (
            dep is not None
            and ch.is_ours(dep, ctx.uid)
            and int((dep.get("spec") or {}).get("replicas") or 0) > 0
            and ch.is_available(dep)
        ):
            return dict(dep)
        return None

    async def _roll(
        self,
        ctx: Ctx,
        job: FineTuneJob,
        found: dict[str, Any],
        rendered: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> Any:
        """Patch the existing Deployment to the new run's pod template (same object, same uid, same Service).

        Kubernetes then rolls the pods with the rendered strategy (surge 1, maxUnavailable 0): the previous
        model answers until a new pod is ready. Patching instead of re-creating is what keeps it available.
        Keys the new template no longer has are removed (a merge patch alone would keep them).
        """
        meta = found["metadata"]
        old_tpl = (found.get("spec") or {}).get("template") or {}
        patch = {
            "metadata": {"annotations": {c.ANNOTATION_RUN: job.spec.run_id, **metrics_annotation(metrics)}},
            "spec": {"template": with_deletions(old_tpl, copy.deepcopy(rendered["spec"]["template"]))},
        }
        patch["spec"]["template"].update({k: None for k in old_tpl if k not in rendered["spec"]["template"]})
        updated = await self.kube.patch(found["apiVersion"], found["kind"], ctx.namespace, meta["name"], patch)
        updated.setdefault("apiVersion", found["apiVersion"])
        updated.setdefault("kind", found["kind"])
        self._note_own_write(ctx, updated)
        ctx.events.append(
            st.Event("Normal", Reason.ROLLING_OUT, f"rolling Deployment {meta['name']} to run {job.spec.run_id}")
        )
        return updated

    async def _serve(
        self, ctx: Ctx, job: FineTuneJob, step: Step, sst: StageStatus, metrics: Mapping[str, float] | None = None
    ) -> tuple[bool, bool]:
        """Ensure the vLLM Deployment and Service; scale to ``serve.replicas``; (serving, rolling).

        ``spec.suspend`` while serving scales the Deployment to 0 (the GPUs are what suspending frees) and
        resuming scales it back; the endpoint leaves ``status.outputs`` while nothing answers there. After a
        re-run the existing Deployment is rolled to the new model (:meth:`_roll`); ``rolling`` stays True
        until every replica runs it, and ``status.outputs`` keeps the previous run's paths until then.
        ``metrics`` (this run's evaluation) are recorded on the Deployment it creates or rolls
        (:data:`~finetune_operator.api.constants.ANNOTATION_METRICS`): the next run's gate compares with them.
        """
        deployment: dict[str, Any] | None = None
        existed_before = sst.attempts > 0
        for obj in step.objects:
            meta = obj["metadata"]
            # Serving never started: create straight away instead of reading first (two GETs per pipeline);
            # a 409 adopts what exists when it is ours (a previous run's Deployment, then rolled below).
            found = (
                await self.kube.get(obj["apiVersion"], obj["kind"], ctx.namespace, meta["name"])
                if existed_before
                else None
            )
            if found is not None and not ch.is_ours(found, ctx.uid):
                raise Blocked(f"{obj['kind']} {meta['name']} exists but is not owned by this FineTuneJob", warn=True)
            if found is None:
                await self._accept(ctx)
                body = ch.with_owner(obj, ctx.ftj)
                if obj is step.workload and (note := metrics_annotation(metrics)):
                    body["metadata"]["annotations"] = {**(body["metadata"].get("annotations") or {}), **note}
                found = await self._create(ctx, body)
                if existed_before:
                    ctx.events.append(
                        st.Event(
                            "Warning", Reason.CHILD_RECREATED, f"{obj['kind']} {meta['name']} was missing; recreated"
                        )
                    )
            if (
                obj is step.workload
                and job.spec.run_id
                and ((found["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) != job.spec.run_id)
            ):
                found = await self._roll(ctx, job, found, obj, metrics)
            if obj is step.workload:
                deployment = found
        assert deployment is not None
        if sst.start_time is None:
            sst.start_time = ctx.stamp
        sst.state, sst.attempts = StageState.RUNNING, max(1, sst.attempts)
        want = 0 if job.spec.suspend else job.spec.serve.replicas
        have = (deployment.get("spec") or {}).get("replicas")
        if have != want:
            deployment = await self.kube.patch(
                "apps/v1", "Deployment", ctx.namespace, deployment["metadata"]["name"], {"spec": {"replicas": want}}
            )
            why = " (spec.suspend)" if job.spec.suspend else ""
            reason = Reason.SUSPENDED if job.spec.suspend else Reason.SCALED
            ctx.events.append(
                st.Event("Normal", reason, f"scaled Deployment {deployment['metadata']['name']} to {want}{why}")
            )
        serving = want > 0 and ch.is_available(deployment)
        # Only runs roll an existing Deployment; without a runId the first rollout is the only one.
        rolling = bool(job.spec.run_id) and want > 0 and not ch.rollout_complete(deployment)
        if job.spec.suspend:
            sst.state, sst.message = StageState.SUSPENDED, "suspended (spec.suspend): scaled to 0 replicas"
        elif serving and rolling:
            sst.message = f"rolling out the model of run {job.spec.run_id}"
        elif serving:
            sst.message = None
        else:
            cs = ch.interpret(deployment)
            sst.message = cs.message or ("scaled to 0 replicas" if want == 0 else "waiting for the Deployment")
        return serving, rolling
