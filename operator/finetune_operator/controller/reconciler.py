"""The reconcile loop: one FineTuneJob's desired children and status from its spec, its children and its status.

Level-based, not edge-based. ``reconcile`` never asks "what happened?", only "what is there now?": it reads
the FineTuneJob, renders the plan, reads the current step's child, and decides. Any trigger (create, update,
a child's status change, a worker's progress report, the resync timer, an operator restart) runs the same
function, so a missed or duplicated event cannot derail a pipeline.

Where the truth lives, and why nothing is lost across restarts:

* **Children** have deterministic names (:mod:`finetune_operator.api.naming`), so creating one twice is a
  409, never a duplicate. An existing child is adopted only when it carries our labels and a controller
  ownerReference to this FineTuneJob's uid.
* **Attempts**: every workload carries ``finetune.dev/attempt``. A retry is recorded in ``status`` (stage
  ``Retrying``) *before* the failed workload is deleted, and the new workload's annotation is authoritative
  afterwards, so a crash between any two API calls neither loses a retry nor counts one twice.
* **Status** is written with the resourceVersion it was computed from (optimistic concurrency). A 409 means
  someone (a worker's progress report, another write) got in between: re-read and recompute, since every
  action taken on the way is idempotent.
* **The accepted spec** is recorded once, in annotation ``finetune.dev/accepted-spec``, before the first
  child is created (see :mod:`finetune_operator.controller.spec`).
* **Runs.** A new ``spec.runId`` is the one accepted change of the training fields:
  :meth:`~.accepting.Accepting._start_run` stops the previous run's unfinished workload, resets the stages
  (keeping the serve stage, whose Deployment goes on serving the previous model), then records the new
  accepted spec; the new run's children have run-scoped names, so nothing is adopted from the previous run.
  At the serve step the existing Deployment is patched to the new model and rolls; ``Ready`` and the
  previous outputs stay until it has rolled out.

Where each decision lives (each module's docstring says more):

* :mod:`.accepting`  which spec and run the pipeline runs, terminal jobs, the validation/render cache;
* :mod:`.stepping`   one training step's workload: create/adopt, success, retry, failure, suspend, drift;
* :mod:`.serving`    the vLLM Deployment and Service: create, scale, suspend, roll to a new run;
* :mod:`.gating`     the eval/publish results (pods' termination messages) and the promotion gate;
* :mod:`.writing`    the status (built from the API models), when it is written, our own watch echoes, events;
* :mod:`.context`    what they share: configuration, the per-reconcile scratch, the enum outcomes;
* this module        the entry point and the walk over the plan's steps that ties them together.

No finalizer: children are deleted by the garbage collector through their ownerReferences, and the operator
has nothing else to clean up. A finalizer would only add the failure mode of FineTuneJobs that can never be
deleted once the operator is uninstalled.
"""

from __future__ import annotations

import logging
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason, StageState
from finetune_operator.api.types import FineTuneJob, StageStatus
from finetune_operator.controller import metrics
from finetune_operator.controller import status as st
from finetune_operator.controller.accepting import Decision
from finetune_operator.controller.context import (
    Blocked,
    Ctx,
    EventSink,
    ReconcilerConfig,
    StepOutcome,
    with_deletions,
)
from finetune_operator.controller.gating import Gating
from finetune_operator.controller.kube import ApiError, Conflict, NotFound, Unavailable, fresh_reads
from finetune_operator.controller.stepping import Evidence, fresh_stage
from finetune_operator.render.plan import Plan

__all__ = ["EventSink", "Reconciler", "ReconcilerConfig", "_with_deletions"]

log = logging.getLogger(__name__)

#: Kept importable under its old name (tests of the patch builder use it).
_with_deletions = with_deletions


class Reconciler(Gating):
    """Drives FineTuneJobs; one instance per operator process (it keeps only caches that may be lost)."""

    async def reconcile(self, namespace: str, name: str, *, deep: bool = False) -> float | None:
        """Bring one FineTuneJob closer to its desired state; seconds until it wants another look (or None).

        ``deep`` also verifies that every object of the current step exists (the resync's drift repair);
        normal reconciles look at the workload only, which is what changes.
        """
        metrics.RECONCILES.inc()
        fresh = deep
        for _ in range(self.config.conflict_retries):
            try:
                if fresh:  # drift checks and conflict recovery read from the server, not a cache
                    with fresh_reads():
                        return await self._reconcile(namespace, name, deep=deep)
                return await self._reconcile(namespace, name, deep=deep)
            except Conflict:
                metrics.STATUS_CONFLICTS.inc()
                fresh = True
                continue
            except NotFound:
                return None  # the FineTuneJob was deleted under us
            except ApiError as exc:
                if exc.status != 403:
                    raise
                return await self._forbidden(namespace, name, exc)
        raise Conflict(409, "Conflict", f"{namespace}/{name}: status kept changing under the operator")

    async def _forbidden(self, namespace: str, name: str, exc: ApiError) -> float:
        """A request the operator's RBAC does not grant: say so where users look, and retry slowly.

        Retrying at once would only repeat the refusal (a silent hot loop); the fix is an RBAC change, which
        the next slow retry picks up. The condition is ``Progressing=False`` with reason ``Forbidden`` and the
        API server's message; the Warning event is posted once per distinct message (the condition is the
        record of whether it was already said, so a restart does not repeat it).
        """
        message = (
            f"the API server refused a request of the operator: {exc.message or exc} (grant it in the "
            "operator's RBAC: the chart's rules come from finetune_operator/controller/rbac.py)"
        )
        log.warning("%s/%s: %s", namespace, name, message)
        try:
            ftj = await self.kube.get(c.API_VERSION, c.KIND, namespace, name)
            if ftj is None:
                return self.config.refused_interval
            ctx = Ctx(ftj, self.clock())
            conditions = [dict(x) for x in (ftj.get("status") or {}).get("conditions") or []]
            said = any(
                x.get("type") == c.ConditionType.PROGRESSING
                and x.get("reason") == Reason.FORBIDDEN
                and x.get("message") == message
                for x in conditions
            )
            if not said:
                generation = ftj["metadata"].get("generation")
                st.set_condition(
                    conditions,
                    c.ConditionType.PROGRESSING,
                    False,
                    Reason.FORBIDDEN,
                    message,
                    now=ctx.stamp,
                    generation=generation,
                )
                patch = {
                    "metadata": {"resourceVersion": ftj["metadata"].get("resourceVersion")},
                    "status": {"conditions": conditions},
                }
                ctx.ftj = await self.kube.patch(c.API_VERSION, c.KIND, namespace, name, patch, subresource="status")
                self._note_own_write(ctx)
                ctx.events.append(st.Event("Warning", Reason.FORBIDDEN, message))
                self._post(ctx)
        except ApiError:
            log.warning("%s/%s: could not report the refusal in status", namespace, name, exc_info=True)
        return self.config.refused_interval

    async def _reconcile(self, namespace: str, name: str, *, deep: bool) -> float | None:
        ftj = await self.kube.get(c.API_VERSION, c.KIND, namespace, name)
        if ftj is None:
            self.forget(namespace, name)
            return None
        meta = ftj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector takes the children
        ctx = Ctx(ftj, self.clock())
        old_status: dict[str, Any] = ftj.get("status") or {}
        acceptance = await self._decide(ctx, old_status)
        if acceptance.decision is Decision.RUN_STARTED:
            return 0.0  # drive the new run from a fresh read
        if acceptance.decision is not Decision.DRIVE:
            return None
        assert acceptance.job is not None and acceptance.plan is not None
        job, plan = acceptance.job, acceptance.plan
        stages = self._stage_statuses(plan, old_status)
        summary = await self._walk(ctx, job, plan, stages, old_status, deep=deep)
        new_status = self._compose(ctx, job, plan, stages, summary, old_status, acceptance.verdict)
        await self._write(ctx, old_status, new_status)
        return ctx.requeue

    async def _walk(
        self,
        ctx: Ctx,
        job: FineTuneJob,
        plan: Plan,
        stages: list[StageStatus],
        old_status: dict[str, Any],
        *,
        deep: bool,
    ) -> st.Summary:
        """Drive the plan's steps in order up to the first one that is not done; the pipeline's summary."""
        summary_kw: dict[str, Any] = {"serve_enabled": any(s.kind == "serve" for s in plan.steps)}
        summary_kw["serving_previous"] = await self._serving_previous(ctx, job, plan, stages)
        current: str | None = None
        evidence = Evidence(self, ctx, plan)
        for i, step in enumerate(plan.steps):
            sst = stages[i]
            if sst.state == StageState.SUCCEEDED and step.kind != "serve":
                if await evidence.proves_succeeded(i):
                    if await self._after_success(ctx, job, plan, stages, i, evidence, summary_kw, old_status):
                        continue
                    break  # the promotion gate failed: nothing after the evaluation runs
                if await evidence.child(i) is None:
                    stages[i] = sst = fresh_stage(step)  # a success nothing proves: the step was never run
            current = step.name
            # Steps after the current one have not started in this run, whatever status says.
            for j in range(i + 1, len(plan.steps)):
                if plan.steps[j].kind != "serve" and (stages[j].state != StageState.PENDING or stages[j].attempts):
                    stages[j] = fresh_stage(plan.steps[j])
            try:
                if step.kind == "serve":
                    served = await self._serve(ctx, job, step, sst, summary_kw.get("metrics"))
                    summary_kw["serving"], summary_kw["rolling"] = served.serving, served.rolling
                    summary_kw["not_answering"], summary_kw["serve_note"] = served.not_answering, served.note
                    if served.not_answering is not None:
                        summary_kw["current_message"] = served.not_answering
                    summary_kw["suspended"] = sst.state == StageState.SUSPENDED
                    break
                outcome = await self._drive(ctx, job, plan, step, sst, first=i == 0, deep=deep)
            except Blocked as exc:
                sst.message = str(exc)
                if exc.warn:
                    ctx.events.append(st.Event("Warning", Reason.CHILD_CONFLICT, str(exc)))
                ctx.requeue_after(exc.retry_after if exc.retry_after is not None else self.config.wait_interval)
                break
            except (Conflict, Unavailable):
                raise
            except ApiError as exc:
                # Refused for good (a 4xx): most often the workload kind is not installed (no Kubeflow training
                # operator, no T9k), or admission/quota said no. Say so where users look, and try again later.
                kind = step.workload["kind"]
                hint = f" (is the {kind} CRD installed?)" if isinstance(exc, NotFound) else ""
                msg = f"the API server refused a {kind} of stage {step.name}: {exc}{hint}"
                if sst.message != msg:
                    ctx.events.append(st.Event("Warning", Reason.CREATE_FAILED, msg))
                sst.message = msg
                summary_kw["current_message"] = msg
                ctx.requeue_after(self.config.refused_interval)
                break
            if outcome is StepOutcome.ADVANCE:
                current = None
                if await self._after_success(ctx, job, plan, stages, i, evidence, summary_kw, old_status):
                    continue
                break
            if outcome is StepOutcome.RETRY_NOW:
                ctx.requeue_after(0.0)
            elif outcome is StepOutcome.FAILED:
                summary_kw["failed"] = sst.message or f"stage {step.name} failed"
                summary_kw["failed_reason"] = ctx.failed_reason or (
                    Reason.RETRIES_EXHAUSTED if job.spec.retries else Reason.STAGE_FAILED
                )
            summary_kw["current_message"] = self._stage_message(step, sst)
            summary_kw["suspended"] = sst.state == StageState.SUSPENDED
            break

        non_serve = [stages[i] for i, s in enumerate(plan.steps) if s.kind != "serve"]
        # A run whose model failed the promotion gate did not succeed, even when no step is left before serve.
        succeeded = all(s.state == StageState.SUCCEEDED for s in non_serve) and "gate_failed" not in summary_kw
        return st.Summary(current=current, succeeded=succeeded, **summary_kw)
