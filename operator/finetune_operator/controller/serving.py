"""Serving: the vLLM Deployment and Service after training, scaling, suspending and rolling to a new run.

Decisions that live here:

* **Ensure** the Deployment and Service exist and are ours (:meth:`Serving._serve`); a missing one is
  re-created (drift), one that is not ours blocks the step.
* **Scale** to ``serve.replicas``, or to 0 while ``spec.suspend`` (the GPUs are what suspending frees).
* **Roll** the existing Deployment to a new run's model by patching its pod template
  (:meth:`Serving._roll`): the same object keeps answering until a new pod is ready.
* **Serving the previous run** while a new one trains (:meth:`Serving._serving_previous`): Ready and the
  endpoint stay.
* **Answering** (:meth:`Serving._answers`, rules in :mod:`.answering`): after a rollout is complete, one real
  chat completion through the Service must succeed before the job counts as serving (``Ready``); until then
  ``Ready`` is False with reason ``ServiceNotAnswering`` and the check is retried with backoff. With
  ``serve.apiKeySecretRef`` the completion is sent by an answer Job inside the cluster instead
  (:meth:`Serving._answer_by_job`), judged by the same rules.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason, StageState
from finetune_operator.api.types import FineTuneJob, StageStatus
from finetune_operator.controller import answering, results
from finetune_operator.controller import children as ch
from finetune_operator.controller import status as st
from finetune_operator.controller.context import Blocked, Ctx, with_deletions
from finetune_operator.controller.kube import Unavailable
from finetune_operator.controller.stepping import Stepping
from finetune_operator.render.answer import answer_job, answer_job_name
from finetune_operator.render.plan import Plan, Step
from finetune_operator.render.serve import served_model_name

log = logging.getLogger(__name__)

#: Rollouts whose failed answer checks are remembered (oldest dropped first).
_ANSWERS_MAX: Final = 4096
#: Seconds between looks at a running answer Job (its pod's termination is not watched).
_ANSWER_JOB_POLL: Final = 2.0


@dataclass(frozen=True)
class ServeOutcome:
    """What the serve step found: whether the model is served, whether it rolls, why it does not answer yet."""

    #: The Deployment is available and its Service answered a chat completion for this rollout (or, while it
    #: rolls, for the previous one: the old pods still answer).
    serving: bool
    #: The Deployment is rolling to the new run's model (old pods may still answer).
    rolling: bool
    #: Available, but the answer check has not passed: why (None when it passed or was not due).
    not_answering: str | None = None
    #: A note on the Ready message (none today: every rollout is checked, with an API key by an answer Job).
    note: str = ""


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
    ) -> ServeOutcome:
        """Ensure the vLLM Deployment and Service; scale to ``serve.replicas``; check that it answers.

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
            scale: dict[str, Any] = {"spec": {"replicas": want}}
            if want == 0:  # nothing answers at zero: the next scale-up is a rollout to check again
                scale["metadata"] = {"annotations": {c.ANNOTATION_ANSWERED: None}}
            deployment = await self.kube.patch(
                "apps/v1", "Deployment", ctx.namespace, deployment["metadata"]["name"], scale
            )
            why = " (spec.suspend)" if job.spec.suspend else ""
            reason = Reason.SUSPENDED if job.spec.suspend else Reason.SCALED
            ctx.events.append(
                st.Event("Normal", reason, f"scaled Deployment {deployment['metadata']['name']} to {want}{why}")
            )
        available = want > 0 and ch.is_available(deployment)
        # Only runs roll an existing Deployment; without a runId the first rollout is the only one.
        rolling = bool(job.spec.run_id) and want > 0 and not ch.rollout_complete(deployment)
        outcome = ServeOutcome(serving=False, rolling=rolling)
        if available and rolling:
            # The old pods answer until the new ones replace them: serving if this Deployment answered before.
            answered = str((deployment["metadata"].get("annotations") or {}).get(c.ANNOTATION_ANSWERED) or "")
            before = answered.startswith(f"{deployment['metadata'].get('uid')}:")
            outcome = ServeOutcome(serving=before, rolling=True)
        elif available:
            outcome = await self._answers(ctx, job, step, deployment)
        serving = outcome.serving
        if job.spec.suspend:
            sst.state, sst.message = StageState.SUSPENDED, "suspended (spec.suspend): scaled to 0 replicas"
        elif serving and rolling:
            sst.message = f"rolling out the model of run {job.spec.run_id}"
        elif serving:
            sst.message = None
        elif outcome.not_answering is not None:
            sst.message = outcome.not_answering
        else:
            cs = ch.interpret(deployment)
            sst.message = cs.message or ("scaled to 0 replicas" if want == 0 else "waiting for the Deployment")
        return outcome

    async def _answers(self, ctx: Ctx, job: FineTuneJob, step: Step, deployment: Mapping[str, Any]) -> ServeOutcome:
        """The answer check of this rollout (see :mod:`.answering`): recorded, due, or sent now.

        Passed once for this rollout (the Deployment's annotation names its uid and template hash): serving.
        Otherwise one chat completion is sent through the Service proxy unless a failed one's backoff is still
        running; a pass is recorded on the Deployment with a Normal event, a failure is remembered (backoff,
        one Warning event after :data:`~.answering.WARN_AFTER` in a row) and keeps the job not serving.
        """
        meta = deployment["metadata"]
        template = (step.workload["spec"]["template"].get("metadata") or {}).get("annotations") or {}
        key = answering.answered_value(str(meta.get("uid") or ""), str(template.get(c.ANNOTATION_SPEC_HASH) or ""))
        if (meta.get("annotations") or {}).get(c.ANNOTATION_ANSWERED) == key:
            return ServeOutcome(serving=True, rolling=False)
        service = next(o for o in step.objects if o["kind"] == "Service")
        svc_name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
        failures, not_before, detail = self._answer_failures.get(key, (0, 0.0, ""))
        if failures and ctx.now < not_before:
            ctx.requeue_after(not_before - ctx.now)
            return ServeOutcome(
                serving=False, rolling=False, not_answering=self._not_answering(svc_name, failures, detail)
            )
        model = served_model_name(job)
        if job.spec.serve.api_key_secret_ref is not None:
            # vLLM needs the key, which the operator does not hold: the answer Job checks from inside.
            # One Job name per rollout *occurrence*: a resume keeps uid and template (the same ``key``) but
            # changes the generation, and the first occurrence's finished Job must not answer for it.
            rollout = f"{key}@{meta.get('generation') or 0}"
            by_job = await self._answer_by_job(ctx, job, rollout, failures + 1)
            if by_job is None:
                ctx.requeue_after(_ANSWER_JOB_POLL)
                waiting = (
                    self._not_answering(svc_name, failures, detail)
                    if failures
                    else (
                        f"the vLLM Deployment is available; waiting for the answer Job "
                        f"{answer_job_name(job, rollout, 1)} (a chat completion with the API key)"
                    )
                )
                return ServeOutcome(serving=False, rolling=False, not_answering=waiting)
            answer = by_job
        else:
            path = answering.proxy_path(ctx.namespace, svc_name, port)
            try:
                status, body = await self.kube.post_raw(
                    path, answering.request_body(model), timeout=self.config.answer_timeout
                )
                answer = answering.judge(status, body, model)
            except Unavailable as exc:
                answer = answering.Answer(False, f"no answer: {exc.reason or 'error'}")
        if answer.ok:
            self._answer_failures.pop(key, None)
            patch = {"metadata": {"annotations": {c.ANNOTATION_ANSWERED: key}}}
            updated = await self.kube.patch("apps/v1", "Deployment", ctx.namespace, meta["name"], patch)
            updated.setdefault("apiVersion", "apps/v1")
            updated.setdefault("kind", "Deployment")
            self._note_own_write(ctx, updated)
            run = f" (run {job.spec.run_id})" if job.spec.run_id else ""
            ctx.events.append(
                st.Event(
                    "Normal",
                    Reason.SERVICE_ANSWERED,
                    f"Service {svc_name} answered a chat completion of model {model!r}{run}",
                )
            )
            return ServeOutcome(serving=True, rolling=False)
        failures += 1
        delay = answering.retry_delay(failures, self.config.answer_retry_initial, self.config.answer_retry_max)
        self._answer_failures[key] = (failures, ctx.now + delay, answer.detail)
        self._answer_failures.move_to_end(key)
        while len(self._answer_failures) > _ANSWERS_MAX:
            self._answer_failures.popitem(last=False)
        message = self._not_answering(svc_name, failures, answer.detail)
        log.info("%s/%s: %s", ctx.namespace, ctx.name, message)
        if failures == answering.WARN_AFTER:
            ctx.events.append(st.Event("Warning", Reason.SERVICE_NOT_ANSWERING, message))
        ctx.requeue_after(delay)
        return ServeOutcome(serving=False, rolling=False, not_answering=message)

    async def _answer_by_job(self, ctx: Ctx, job: FineTuneJob, rollout: str, attempt: int) -> answering.Answer | None:
        """The verdict of attempt ``attempt`` of the answer Job of ``rollout`` (``<uid>:<template hash>@<Deployment
        generation>``; created when missing); None while
        it runs. Read from the termination message of the Job's own pod (:func:`.results.answer_verdict`), never
        from status; a Job that failed without a verdict (deadline, image pull) is a failed check."""
        body = answer_job(job, job.spec.image or self.config.worker_image, rollout, attempt)
        name = body["metadata"]["name"]
        found = await self.kube.get("batch/v1", "Job", ctx.namespace, name)
        if found is not None and not ch.is_ours(found, ctx.uid):
            raise Blocked(f"Job {name} exists but is not owned by this FineTuneJob", warn=True)
        if found is None:
            found = await self._create(ctx, ch.with_owner(body, ctx.ftj))
            return None
        uid = str(found["metadata"].get("uid") or "")
        pods = await self.kube.list("v1", "Pod", ctx.namespace, results.job_pod_selector(name))
        verdict = results.answer_verdict(pods, uid)
        if verdict is not None:
            return verdict
        for cond in (found.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Failed" and cond.get("status") == "True":
                why = cond.get("reason") or "Failed"
                return answering.Answer(False, f"answer Job {name} failed without a verdict ({why})")
        return None

    @staticmethod
    def _not_answering(service: str, failures: int, detail: str) -> str:
        tries = "1 try" if failures == 1 else f"{failures} tries"
        return (
            f"the vLLM Deployment is available but Service {service} did not answer a chat completion "
            f"({tries}, last: {detail}); retrying"
        )
