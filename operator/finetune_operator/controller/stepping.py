"""Driving steps: one download/train/merge step's workload from creation to success, retry or failure.

Decisions that live here:

* **Which steps are done** (:class:`Evidence`): decided from the children, never from status alone (worker
  pods may write status; what they report is only shown as progress, within bounds).
* **The stages' status** from the plan and the previous status (:meth:`Stepping._stage_statuses`).
* **Create or adopt** (:meth:`Stepping._create`): children have deterministic names, so creating one twice is
  a 409, never a duplicate; an existing child is adopted only when it carries our labels and a controller
  ownerReference to this FineTuneJob's uid, otherwise the step is :class:`~.context.Blocked`.
* **What the workload's state means** (:meth:`Stepping._drive` → :class:`~.context.StepOutcome`): succeeded
  → advance; failed → record a retry (then delete and re-create on the next reconcile) or fail for good;
  vanished while running → re-create (drift); otherwise stay.
* **Attempts** are counted on the workload (``finetune.dev/attempt``); a retry is recorded in status *before*
  the failed workload is deleted, so a crash between two API calls neither loses nor doubles a retry.
* **Suspend** (:meth:`Stepping._suspend`): the operator suspends on the user's behalf and never fights Kueue.
* **Drift repair** of a step's other objects on the resync (:meth:`Stepping._ensure_present`).
* **Pods that cannot start** (:meth:`Stepping._pods_cannot_start`, rules in :mod:`.podstate`): a pod waiting
  for a Secret that does not exist fails the job for good (``SecretNotFound``, recorded first; the next
  reconcile deletes the workload).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api import secretrefs
from finetune_operator.api.constants import Reason, StageState
from finetune_operator.api.history import add_point, point_from_report
from finetune_operator.api.types import FineTuneJob, StageStatus
from finetune_operator.controller import children as ch
from finetune_operator.controller import metrics, podstate
from finetune_operator.controller import status as st
from finetune_operator.controller.accepting import Accepting
from finetune_operator.controller.context import Blocked, Ctx, StepOutcome, parse_time
from finetune_operator.controller.kube import AlreadyExists, fresh_reads
from finetune_operator.render.plan import Plan, Step

#: Exit codes of the preflight pod that refuse the job (see finetune_operator.errors), by Failed reason.
PREFLIGHT_EXIT_REASONS: dict[int, str] = {3: Reason.INVALID_DATA, 12: Reason.WILL_NOT_FIT}
_EXIT_CODE = re.compile(r"exit code (\d+)")
#: Longest explanation taken from the (pod-written) plan.
_PLAN_MESSAGE_MAX = 2048
#: Longest wait (seconds) between two looks at the pods of a step that has not started.
_POD_CHECK_MAX = 300.0


def _plan_message(ftj: Mapping[str, Any]) -> str | None:
    plan = (ftj.get("status") or {}).get("plan")
    message = plan.get("message") if isinstance(plan, Mapping) else None
    return message[:_PLAN_MESSAGE_MAX] if isinstance(message, str) and message else None


def preflight_refusal(ftj: Mapping[str, Any], job_message: str) -> tuple[str, str] | None:
    """(reason, message) when the preflight Job failed by refusing (its FailJob exit code 3 or 12, as the Job
    controller wrote it into the Failed condition); None for other failures (retried like any step)."""
    found = _EXIT_CODE.search(job_message or "")
    reason = PREFLIGHT_EXIT_REASONS.get(int(found.group(1))) if found else None
    if reason is None:
        return None
    return reason, f"{reason}: {_plan_message(ftj) or job_message}"


def preflight_warning(ftj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a plan that passed only because ``spec.preflight.mode`` is ``Warn``."""
    plan = (ftj.get("status") or {}).get("plan")
    reason = plan.get("reason") if isinstance(plan, Mapping) else None
    if reason not in PREFLIGHT_EXIT_REASONS.values():
        return None
    return str(reason), f"preflight: {_plan_message(ftj) or reason} (spec.preflight.mode is Warn: training anyway)"


def fresh_stage(step: Step) -> StageStatus:
    """The status of a step that has not started (what a new plan's stages begin with)."""
    return StageStatus(
        name=step.name,
        type=step.type,
        workload_kind=step.workload["kind"],
        workload_name=step.workload["metadata"]["name"],
        state=StageState.PENDING,
        attempts=0,
    )


class Evidence:
    """What the children prove about the steps of one plan, read lazily once per reconcile.

    Status is a record, not evidence: worker pods may write it. A step counts as succeeded when

    * its workload exists, is ours and says so (written by the Job/PyTorchJob/DeepSpeedJob controller); or
    * its workload is gone (``ttlSecondsAfterFinished``, or deleted by hand) and a *later* step's child exists:
      the operator creates a step's objects only after it saw every earlier step succeed; or
    * no child of the plan exists at all (every workload expired): the record stands, since no workload of the
      pipeline is left running that could have written it.

    The serve Deployment keeps its name across runs (``spec.runId``): it counts as a child of this run only
    once it was rolled to this run's model (its ``finetune.dev/run`` annotation), which the serve step does.
    """

    def __init__(self, owner: Stepping, ctx: Ctx, plan: Plan) -> None:
        self._owner, self._ctx, self._plan = owner, ctx, plan
        self._children: dict[int, dict[str, Any] | None] = {}

    async def child(self, i: int) -> dict[str, Any] | None:
        """Step ``i``'s workload if it exists and is ours (not being deleted)."""
        if i not in self._children:
            wl, uid = self._plan.steps[i].workload, self._ctx.uid
            kube, ns = self._owner.kube, self._ctx.namespace
            found = await kube.get(wl["apiVersion"], wl["kind"], ns, wl["metadata"]["name"])
            if found is not None and (found["metadata"].get("deletionTimestamp") or not ch.is_ours(found, uid)):
                found = None
            run = (self._ctx.ftj.get("spec") or {}).get("runId")
            if found is not None and run and self._plan.steps[i].kind == "serve":
                # Still serving a previous run: it proves nothing about this one.
                found = found if (found["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) == run else None
            self._children[i] = found
        return self._children[i]

    async def proves_succeeded(self, i: int) -> bool:
        found = await self.child(i)
        if found is not None:
            return ch.interpret(found).phase == ch.Phase.SUCCEEDED
        later = [await self.child(j) for j in range(i + 1, len(self._plan.steps))]
        if any(x is not None for x in later):
            return True
        return all([await self.child(j) is None for j in range(i)])


class Stepping(Accepting):
    """Creates, adopts, retries and suspends the workloads of the training steps."""

    def _stage_statuses(self, plan: Plan, old_status: Mapping[str, Any]) -> list[StageStatus]:
        """``status.stages`` for every step of the plan, carrying over what the old status knew."""
        old = {s.name: s for s in st.parse_stages(old_status.get("stages"))}
        reported = old_status.get("reported") or {}
        out = []
        for step in plan.steps:
            before = old.get(step.name)
            sst = before.model_copy(deep=True) if before is not None else StageStatus(name=step.name, type=step.type)
            sst.name = step.name
            sst.type = step.type
            sst.workload_kind = step.workload["kind"]
            sst.workload_name = step.workload["metadata"]["name"]
            sst.state = sst.state  # always written (marks the field set)
            sst.attempts = sst.attempts
            report = reported.get(step.name) if isinstance(reported, Mapping) else None
            progress = st.typed_progress(report)
            if progress is not None:
                sst.progress = progress
            if step.kind == "train" and (point := point_from_report(st.bounded_report(report))) is not None:
                # The loss curve in status: each new reported step becomes a point, merged down to a bound.
                sst.history = add_point(sst.history or [], point)
            out.append(sst)
        return out

    @staticmethod
    def _stage_message(step: Step, sst: StageStatus) -> str:
        what = f"{step.workload['kind']} {step.workload['metadata']['name']}"
        msg = f"stage {step.name}: {what} (attempt {sst.attempts or 1})"
        return f"{msg}: {sst.message}" if sst.message else msg

    async def _drive(
        self, ctx: Ctx, job: FineTuneJob, plan: Plan, step: Step, sst: StageStatus, *, first: bool, deep: bool
    ) -> StepOutcome:
        """One download/train/merge step: create, adopt, retry, suspend, or notice success."""
        wl = step.workload
        never_created = sst.attempts == 0 and sst.state == StageState.PENDING
        # A step never started has no workload: go straight to creating it (a 409 is handled by adoption),
        # saving a GET per hand-off.
        child = (
            None
            if never_created
            else await self.kube.get(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
        )
        if child is not None and not ch.is_ours(child, ctx.uid):
            raise Blocked(
                f"{wl['kind']} {wl['metadata']['name']} exists but is not owned by this FineTuneJob; "
                "it is left alone (delete it to let the pipeline continue)",
                warn=not child["metadata"].get("deletionTimestamp"),
            )
        if (
            child is not None
            and sst.state == StageState.FAILED
            and st.verdict_reason(sst.message) == Reason.SECRET_NOT_FOUND
        ):
            # Failed for good last time because its pod cannot start (recorded first): stop the workload, whose
            # pod would otherwise wait for the Secret forever, holding its node's resources.
            ctx.failed_reason = Reason.SECRET_NOT_FOUND
            if not child["metadata"].get("deletionTimestamp"):
                await self.kube.delete(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
            return StepOutcome.FAILED
        if child is not None and child["metadata"].get("deletionTimestamp"):
            raise Blocked(f"waiting for the old {wl['kind']} {wl['metadata']['name']} to be deleted", warn=False)

        if child is None and sst.state == StageState.FAILED:
            # Failed for good and its workload since deleted: the pipeline stays failed (failing closed: a
            # forged failure can only stop the job whose pod wrote it, which that pod could do by exiting).
            ctx.failed_reason = st.verdict_reason(sst.message)
            return StepOutcome.FAILED
        if child is None:
            attempts = sst.attempts
            if sst.state == StageState.RETRYING or attempts == 0:
                attempt = attempts + 1
            else:  # it was running and vanished: drift (deleted by hand, or lost with its node)
                attempt = attempts
                ctx.events.append(
                    st.Event(
                        "Warning",
                        Reason.CHILD_RECREATED,
                        f"{wl['kind']} {wl['metadata']['name']} was missing; recreated",
                    )
                )
            await self._accept(ctx)
            child = await self._create_objects(
                ctx, job, plan, step, attempt, shared=first or attempt > 1 or attempts > 0
            )
            sst.state, sst.attempts, sst.message = StageState.RUNNING, attempt, None
            if sst.start_time is None:
                sst.start_time = ctx.stamp
            sst.completion_time = None
        elif deep:
            await self._ensure_present(ctx, plan, step, shared=True, recreate_workload=False)

        attempt = ch.attempt_of(child)
        sst.attempts = max(attempt, sst.attempts)
        cs = ch.interpret(child)
        what = f"{wl['kind']} {wl['metadata']['name']}"

        if cs.phase == ch.Phase.SUCCEEDED:
            if step.kind == "preflight" and sst.state != StageState.SUCCEEDED:
                warned = preflight_warning(ctx.ftj)
                if warned is not None:
                    ctx.events.append(st.Event("Warning", *warned))
            sst.state, sst.message = StageState.SUCCEEDED, None
            if sst.start_time is None:
                sst.start_time = ctx.stamp
            sst.completion_time = str((child.get("status") or {}).get("completionTime") or ctx.stamp)
            return StepOutcome.ADVANCE

        if cs.phase == ch.Phase.FAILED and step.kind == "preflight":
            refused = preflight_refusal(ctx.ftj, cs.message)
            if refused is not None:
                # A deterministic verdict: no retry. The reason comes from the Job (the exit code the Job
                # controller recorded), the explanation from the pod's report.
                ctx.failed_reason, sst.message = refused
                sst.state, sst.completion_time = StageState.FAILED, ctx.stamp
                return StepOutcome.FAILED

        if cs.phase == ch.Phase.FAILED:
            why = ": ".join(x for x in (cs.reason, cs.message) if x) or "failed"
            if attempt <= job.spec.retries:
                if sst.state != StageState.RETRYING or sst.attempts != attempt:
                    # Record the retry first; only the next reconcile (after this write) deletes the child.
                    sst.state, sst.attempts, sst.message = StageState.RETRYING, attempt, f"{what} failed: {why}"
                    return StepOutcome.RETRY_NOW
                await self.kube.delete(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
                new = await self._create_objects(ctx, job, plan, step, attempt + 1, shared=True)
                sst.state, sst.attempts, sst.message = StageState.RUNNING, ch.attempt_of(new), None
                return StepOutcome.STAY
            total = attempt
            sst.state = StageState.FAILED
            sst.message = f"{what} failed after {total} attempt{'s' if total != 1 else ''}: {why}"
            sst.completion_time = ctx.stamp
            return StepOutcome.FAILED

        await self._suspend(ctx, job, child)
        if ch.is_suspended(child):
            if job.spec.suspend:
                sst.state, sst.message = StageState.SUSPENDED, "suspended (spec.suspend)"
            else:
                sst.state = StageState.RUNNING
                queue = job.spec.scheduling.queue_name
                sst.message = f"waiting for admission by Kueue queue {queue}" if queue else "resuming"
        else:
            sst.state, sst.message = StageState.RUNNING, None
            if await self._pods_cannot_start(ctx, job, step, sst, child):
                return StepOutcome.FAILED
        return StepOutcome.STAY

    async def _pods_cannot_start(
        self, ctx: Ctx, job: FineTuneJob, step: Step, sst: StageStatus, child: Mapping[str, Any]
    ) -> bool:
        """Whether the step's pods wait for a Secret that does not exist (then the stage failed for good).

        Looked at only while the step's pods have not all started and its worker reported nothing; until then
        the step is looked at again on a timer (pods are not watched), less often the longer it waits.
        """
        reported = (ctx.ftj.get("status") or {}).get("reported")
        if isinstance(reported, Mapping) and reported.get(step.name):
            return False  # its worker runs
        listed = await self.kube.list("v1", "Pod", ctx.namespace, podstate.selector(step.workload))
        pods = podstate.of_workload(listed, child)
        found = podstate.stuck(pods)
        if found is None or found.secret is None:
            if found is not None:
                sst.message = f"pod {found.pod} container {found.container}: {podstate.CONFIG_ERROR}: {found.message}"
            if found is not None or not podstate.all_started(pods):
                started = parse_time(sst.start_time)
                age = ctx.now - started if started is not None else 0.0
                interval = self.config.pod_check_interval
                ctx.requeue_after(max(interval, min(age / 4, max(interval, _POD_CHECK_MAX))))
            return False
        fields = secretrefs.fields_naming(job.spec, found.secret, found.key) or secretrefs.fields_naming(
            job.spec, found.secret
        )
        what = f'Secret "{found.secret}"' + (f' has no key "{found.key}"' if found.key else " does not exist")
        named = f" (named by {', '.join(fields)})" if fields else ""
        sst.state, sst.completion_time = StageState.FAILED, ctx.stamp
        sst.message = (
            f"{Reason.SECRET_NOT_FOUND}: {what}{named}: the kubelet cannot start pod {found.pod} "
            f"(container {found.container}): {found.message}; nothing ran after it. Create the Secret, then start "
            "a new run (spec.runId) or re-create the FineTuneJob"
        )
        ctx.failed_reason = Reason.SECRET_NOT_FOUND
        ctx.requeue_after(0.0)  # the next reconcile stops the workload
        return True

    async def _suspend(self, ctx: Ctx, job: FineTuneJob, child: dict[str, Any]) -> None:
        """Apply ``spec.suspend`` to a running workload, without ever fighting Kueue.

        Kueue creates-suspended / admits-by-unsuspending. So the operator suspends on the user's behalf (and
        marks the workload), and on resume unsuspends only what it suspended itself; with a Kueue queue it
        only removes its mark and lets Kueue admit the workload again.
        """
        if not ch.supports_suspend(child):
            return
        meta = child["metadata"]
        ours = ch.ANNOTATION_SUSPENDED_BY_USER in (meta.get("annotations") or {})
        suspended = ch.is_suspended(child)
        queue = job.spec.scheduling.queue_name
        patch: dict[str, Any] | None = None
        if job.spec.suspend and not suspended:
            patch = ch.suspend_patch(child, True, by_user=True)
            ctx.events.append(st.Event("Normal", Reason.SUSPENDED, f"suspended {child['kind']} {meta['name']}"))
        elif not job.spec.suspend and suspended and (ours or not queue):
            if queue:
                patch = {"metadata": {"annotations": {ch.ANNOTATION_SUSPENDED_BY_USER: None}}}
                msg = f"released {child['kind']} {meta['name']} to Kueue queue {queue} for admission"
            else:
                patch = ch.suspend_patch(child, False, by_user=False)
                msg = f"resumed {child['kind']} {meta['name']}"
            ctx.events.append(st.Event("Normal", Reason.RESUMED, msg))
        if patch is not None:
            updated = await self.kube.patch(child["apiVersion"], child["kind"], ctx.namespace, meta["name"], patch)
            updated.setdefault("apiVersion", child["apiVersion"])
            updated.setdefault("kind", child["kind"])
            child.clear()
            child.update(updated)
            self._note_own_write(ctx, child)

    async def _create(self, ctx: Ctx, body: dict[str, Any]) -> dict[str, Any]:
        """Create, or adopt the same-named object when it is ours (a lost response, or a restart)."""
        meta = body["metadata"]
        try:
            created = await self.kube.create(body)
        except AlreadyExists:
            with fresh_reads():
                found = await self.kube.get(body["apiVersion"], body["kind"], ctx.namespace, meta["name"])
            if found is None:  # deleted in between: let the next reconcile create it
                raise Blocked(
                    f"{body['kind']} {meta['name']} was being replaced", warn=False, retry_after=0.2
                ) from None
            if not ch.is_ours(found, ctx.uid):
                raise Blocked(
                    f"{body['kind']} {meta['name']} exists but is not owned by this FineTuneJob; it is left alone",
                    warn=True,
                ) from None
            if found["metadata"].get("deletionTimestamp"):
                raise Blocked(f"waiting for the old {body['kind']} {meta['name']} to be deleted", warn=False) from None
            return found
        metrics.CHILDREN_CREATED.labels(kind=body["kind"]).inc()
        created.setdefault("apiVersion", body["apiVersion"])
        created.setdefault("kind", body["kind"])
        self._note_own_write(ctx, created)
        return created

    async def _create_objects(
        self, ctx: Ctx, job: FineTuneJob, plan: Plan, step: Step, attempt: int, *, shared: bool
    ) -> dict[str, Any]:
        """Create the step's objects in plan order (the shared ConfigMaps first); the workload last-known body."""
        workload: dict[str, Any] | None = None
        for obj in (*plan.shared, *step.objects) if shared else step.objects:
            is_wl = obj is step.workload
            body = ch.with_owner(obj, ctx.ftj, attempt=attempt if is_wl else None)
            if is_wl and job.spec.suspend and ch.supports_suspend(body):
                body = ch.apply_suspend(body, True, by_user=True)
            created = await self._create(ctx, body)
            if is_wl:
                workload = created
        assert workload is not None, "the plan's workload is one of the step's objects"
        return workload

    async def _ensure_present(self, ctx: Ctx, plan: Plan, step: Step, *, shared: bool, recreate_workload: bool) -> None:
        """Drift repair of the non-workload objects (ConfigMaps, Services) of a step."""
        for obj in (*plan.shared, *step.objects) if shared else step.objects:
            if obj is step.workload and not recreate_workload:
                continue
            meta = obj["metadata"]
            if await self.kube.get(obj["apiVersion"], obj["kind"], ctx.namespace, meta["name"]) is None:
                await self._create(ctx, ch.with_owner(obj, ctx.ftj))
                ctx.events.append(
                    st.Event("Warning", Reason.CHILD_RECREATED, f"{obj['kind']} {meta['name']} was missing; recreated")
                )
