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
* **Runs.** A new ``spec.runId`` is the one accepted change of the training fields: :meth:`Reconciler._start_run`
  stops the previous run's unfinished workload, resets the stages (keeping the serve stage, whose Deployment
  goes on serving the previous model), then records the new accepted spec; the new run's children have
  run-scoped names, so nothing is adopted from the previous run. At the serve step the existing Deployment is
  patched to the new model and rolls; ``Ready`` and the previous outputs stay until it has rolled out.

No finalizer: children are deleted by the garbage collector through their ownerReferences, and the operator
has nothing else to clean up. A finalizer would only add the failure mode of FineTuneJobs that can never be
deleted once the operator is uninstalled.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason, StageState
from finetune_operator.api.types import FineTuneJob
from finetune_operator.controller import children as ch
from finetune_operator.controller import metrics
from finetune_operator.controller import spec as specs
from finetune_operator.controller import status as st
from finetune_operator.controller.kube import (
    AlreadyExists,
    ApiError,
    Conflict,
    Kube,
    NotFound,
    Unavailable,
    fresh_reads,
)
from finetune_operator.errors import FineTuneError, SpecError
from finetune_operator.render.plan import Plan, Step

log = logging.getLogger(__name__)

#: Aliases of the shared constants (api/constants.py), kept for the call sites below.
SPEC_ACCEPTED: Final = c.ConditionType.SPEC_ACCEPTED
REASON_ACCEPTED: Final = Reason.ACCEPTED
REASON_CHILD_CONFLICT: Final = Reason.CHILD_CONFLICT
REASON_CREATE_FAILED: Final = Reason.CREATE_FAILED

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


class _Blocked(Exception):
    """The step cannot proceed now (a same-named child being deleted, or one that is not ours)."""

    def __init__(self, message: str, *, warn: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.warn = warn
        self.retry_after = retry_after


# step outcomes of _drive
_ADVANCE = "advance"  # the step succeeded: go on with the next one in the same reconcile
_STAY = "stay"  # the step is running (or suspended); wait for its next event
_RETRY_NOW = "retry-now"  # a retry was recorded; reconcile again at once to act on it
_FAILED = "failed"  # out of retries


class _Ctx:
    """Per-reconcile scratch: the latest FineTuneJob body, the clock, and events to post after the write."""

    def __init__(self, ftj: dict[str, Any], now: float) -> None:
        self.ftj = ftj
        self.now = now
        self.stamp = st.rfc3339(now)
        self.events: list[st.Event] = []
        self.requeue: float | None = None

    @property
    def namespace(self) -> str:
        return str(self.ftj["metadata"].get("namespace") or "default")

    @property
    def name(self) -> str:
        return str(self.ftj["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.ftj["metadata"].get("uid") or "")

    def requeue_after(self, delay: float) -> None:
        self.requeue = delay if self.requeue is None else min(self.requeue, delay)


def _clean(value: Any) -> Any:
    """Drop ``None`` values from dicts (recursively): a structural schema rejects nulls, and merge patch
    would read a null as "delete this field"."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class Reconciler:
    """Drives FineTuneJobs; one instance per operator process (it keeps only caches that may be lost)."""

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
        self._validated: OrderedDict[tuple[Any, ...], FineTuneJob | SpecError] = OrderedDict()
        self._plans: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()
        #: (namespace, name) -> status.state, for the jobs-by-state gauge.
        self.states: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------------------------------ entry

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
        raise Conflict(409, "Conflict", f"{namespace}/{name}: status kept changing under the operator")

    @staticmethod
    def _key(ftj: Mapping[str, Any], spec: Mapping[str, Any], variant: str) -> tuple[Any, ...]:
        """Cache key of a spec: the object's identity and generation (which changes with every spec edit) and
        the accepted-spec annotation; the spec itself only when the server does not count generations."""
        meta = ftj["metadata"]
        accepted = ""
        if variant != "current":  # only the other variants depend on the annotation
            accepted = (meta.get("annotations") or {}).get(specs.ANNOTATION_ACCEPTED_SPEC) or ""
        generation = meta.get("generation")
        ident = generation if generation is not None else specs.dump(spec)
        return (meta.get("namespace"), meta.get("name"), meta.get("uid"), ident, variant, hash(accepted))

    def _validate(self, ftj: Mapping[str, Any], spec: Mapping[str, Any], variant: str) -> tuple[FineTuneJob, Any]:
        """``validate`` with a small LRU cache: a reconcile that finds nothing changed should cost no CPU to
        speak of, not a validation and a render (a render dumps every LLaMA-Factory config: ~10 ms)."""
        key = self._key(ftj, spec, variant)
        hit = self._validated.get(key)
        if hit is None:
            try:
                hit = self.validate({**ftj, "spec": spec})
            except SpecError as exc:
                hit = exc
            self._remember(self._validated, key, hit)
        if isinstance(hit, SpecError):
            raise hit
        return hit, key

    def _render(self, key: Any, job: FineTuneJob) -> Plan:
        """The plan of ``job`` (validated under cache ``key``), rendered once per key."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self.render(job)
            self._remember(self._plans, key, plan)
        return plan

    @staticmethod
    def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_MAX:
            cache.popitem(last=False)

    def forget(self, namespace: str, name: str) -> None:
        self.own_versions.pop((c.KIND, namespace, name), None)
        self.states.pop((namespace, name), None)

    # ------------------------------------------------------------------------------------------ main

    async def _reconcile(self, namespace: str, name: str, *, deep: bool) -> float | None:
        ftj = await self.kube.get(c.API_VERSION, c.KIND, namespace, name)
        if ftj is None:
            self.forget(namespace, name)
            return None
        meta = ftj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        if meta.get("deletionTimestamp"):
            return None  # the garbage collector takes the children
        ctx = _Ctx(ftj, self.clock())
        old_status: dict[str, Any] = ftj.get("status") or {}
        accepted = specs.load((meta.get("annotations") or {}).get(specs.ANNOTATION_ACCEPTED_SPEC))
        spec = ftj.get("spec") or {}
        # A new spec.runId re-runs the pipeline, even a failed or finished one.
        new_run = accepted is not None and specs.is_new_run(accepted, spec)

        if (
            not new_run
            and st.condition_true(old_status, c.ConditionType.FAILED)
            and ((st.get_condition(old_status, c.ConditionType.FAILED) or {}).get("reason") != Reason.INVALID_SPEC)
        ):
            self.states[(namespace, name)] = c.State.FAILED
            return None  # terminal: a failed pipeline stays failed (its children remain for inspection)
        if (
            not new_run
            and old_status.get("state") == c.State.SUCCEEDED
            and old_status.get("observedGeneration") == meta.get("generation")
        ):
            self.states[(namespace, name)] = c.State.SUCCEEDED
            return None  # done, nothing to serve: finished workloads may even be gone (ttlSecondsAfterFinished)

        spec_cond: tuple[bool, str, str] = (True, REASON_ACCEPTED, "")
        run_refused: str | None = None
        if new_run and accepted is not None:
            try:
                self._validate(ftj, spec, "current")
            except SpecError as exc:
                run_refused = f"run {specs.run_id(spec)} is not started: {exc.render()}"
            else:
                await self._start_run(ctx, spec, accepted, old_status)
                return 0.0  # drive the new run from a fresh read
        if accepted is None:
            try:
                job, job_key = self._validate(ftj, spec, "current")
            except SpecError as exc:
                return await self._invalid(ctx, exc.render())
        else:
            changed = specs.changed_immutable_fields(accepted, spec)
            # Unchanged immutable fields (the usual case): the effective spec is the current one.
            effective, variant = (specs.effective_spec(accepted, spec), "effective") if changed else (spec, "current")
            try:
                job, job_key = self._validate(ftj, effective, variant)
            except SpecError as exc:
                spec_cond = (False, Reason.INVALID_SPEC, f"the change is ignored: {exc.render()}")
                try:
                    job, job_key = self._validate(ftj, accepted, "accepted")
                except SpecError as exc2:
                    return await self._invalid(ctx, exc2.render())
            if changed:
                spec_cond = (
                    False,
                    Reason.IMMUTABLE_FIELD,
                    f"{', '.join(changed)} cannot change once the pipeline started; the change is ignored "
                    "(revert it, set a new spec.runId to re-run, or create a new FineTuneJob)",
                )
            if run_refused is not None:
                spec_cond = (False, Reason.INVALID_SPEC, run_refused)
        try:
            plan = self._render(job_key, job)
        except FineTuneError as exc:
            return await self._invalid(ctx, f"cannot render the pipeline: {exc}")

        stages = self._stage_statuses(plan, old_status)
        summary_kw: dict[str, Any] = {"serve_enabled": any(s.kind == "serve" for s in plan.steps)}
        summary_kw["serving_previous"] = await self._serving_previous(ctx, job, plan, stages)
        current: str | None = None
        for i, step in enumerate(plan.steps):
            sst = stages[i]
            if sst.get("state") == StageState.SUCCEEDED:
                continue
            current = step.name
            try:
                if step.kind == "serve":
                    summary_kw["serving"], summary_kw["rolling"] = await self._serve(ctx, job, step, sst)
                    summary_kw["suspended"] = sst.get("state") == StageState.SUSPENDED
                    break
                outcome = await self._drive(ctx, job, plan, step, sst, first=i == 0, deep=deep)
            except _Blocked as exc:
                sst["message"] = str(exc)
                if exc.warn:
                    ctx.events.append(st.Event("Warning", REASON_CHILD_CONFLICT, str(exc)))
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
                if sst.get("message") != msg:
                    ctx.events.append(st.Event("Warning", REASON_CREATE_FAILED, msg))
                sst["message"] = msg
                summary_kw["current_message"] = msg
                ctx.requeue_after(self.config.refused_interval)
                break
            if outcome == _ADVANCE:
                current = None
                continue
            if outcome == _RETRY_NOW:
                ctx.requeue_after(0.0)
            elif outcome == _FAILED:
                summary_kw["failed"] = sst.get("message") or f"stage {step.name} failed"
                summary_kw["failed_reason"] = Reason.RETRIES_EXHAUSTED if job.spec.retries else Reason.STAGE_FAILED
            summary_kw["current_message"] = self._stage_message(step, sst)
            summary_kw["suspended"] = sst.get("state") == StageState.SUSPENDED
            break

        non_serve = [stages[i] for i, s in enumerate(plan.steps) if s.kind != "serve"]
        succeeded = all(s.get("state") == StageState.SUCCEEDED for s in non_serve)
        summary = st.Summary(current=current, succeeded=succeeded, **summary_kw)
        new_status = self._compose(ctx, job, plan, stages, summary, old_status, spec_cond)
        await self._write(ctx, old_status, new_status)
        return ctx.requeue

    # ------------------------------------------------------------------------------------------ steps

    def _stage_statuses(self, plan: Plan, old_status: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``status.stages`` for every step of the plan, carrying over what the old status knew."""
        old = {s.get("name"): s for s in old_status.get("stages") or []}
        reported = old_status.get("reported") or {}
        out = []
        for step in plan.steps:
            sst = copy.deepcopy(old.get(step.name) or {})
            sst.update(
                name=step.name,
                type=step.type,
                workloadKind=step.workload["kind"],
                workloadName=step.workload["metadata"]["name"],
            )
            sst.setdefault("state", StageState.PENDING)
            sst.setdefault("attempts", 0)
            progress = st.fold_progress(reported.get(step.name))
            if progress is not None:
                sst["progress"] = progress
            out.append(sst)
        return out

    @staticmethod
    def _stage_message(step: Step, sst: Mapping[str, Any]) -> str:
        what = f"{step.workload['kind']} {step.workload['metadata']['name']}"
        msg = f"stage {step.name}: {what} (attempt {sst.get('attempts') or 1})"
        return f"{msg}: {sst['message']}" if sst.get("message") else msg

    async def _drive(
        self, ctx: _Ctx, job: FineTuneJob, plan: Plan, step: Step, sst: dict[str, Any], *, first: bool, deep: bool
    ) -> str:
        """One download/train/merge step: create, adopt, retry, suspend, or notice success."""
        wl = step.workload
        never_created = int(sst.get("attempts") or 0) == 0 and sst.get("state") == StageState.PENDING
        # A step never started has no workload: go straight to creating it (a 409 is handled by adoption),
        # saving a GET per hand-off.
        child = (
            None
            if never_created
            else await self.kube.get(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
        )
        if child is not None and not ch.is_ours(child, ctx.uid):
            raise _Blocked(
                f"{wl['kind']} {wl['metadata']['name']} exists but is not owned by this FineTuneJob; "
                "it is left alone (delete it to let the pipeline continue)",
                warn=not child["metadata"].get("deletionTimestamp"),
            )
        if child is not None and child["metadata"].get("deletionTimestamp"):
            raise _Blocked(f"waiting for the old {wl['kind']} {wl['metadata']['name']} to be deleted", warn=False)

        if child is None:
            state = sst.get("state")
            attempts = int(sst.get("attempts") or 0)
            if state == StageState.RETRYING or attempts == 0:
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
            sst.update(state=StageState.RUNNING, attempts=attempt)
            sst.pop("message", None)
            sst.setdefault("startTime", ctx.stamp)
            sst.pop("completionTime", None)
        elif deep:
            await self._ensure_present(ctx, plan, step, sst, shared=True, recreate_workload=False)

        attempt = ch.attempt_of(child)
        sst["attempts"] = max(attempt, int(sst.get("attempts") or 0))
        cs = ch.interpret(child)
        what = f"{wl['kind']} {wl['metadata']['name']}"

        if cs.phase == ch.Phase.SUCCEEDED:
            sst.update(state=StageState.SUCCEEDED)
            sst.pop("message", None)
            sst.setdefault("startTime", ctx.stamp)
            sst["completionTime"] = str((child.get("status") or {}).get("completionTime") or ctx.stamp)
            return _ADVANCE

        if cs.phase == ch.Phase.FAILED:
            why = ": ".join(x for x in (cs.reason, cs.message) if x) or "failed"
            if attempt <= job.spec.retries:
                if sst.get("state") != StageState.RETRYING or int(sst.get("attempts") or 0) != attempt:
                    # Record the retry first; only the next reconcile (after this write) deletes the child.
                    sst.update(state=StageState.RETRYING, attempts=attempt, message=f"{what} failed: {why}")
                    return _RETRY_NOW
                await self.kube.delete(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
                new = await self._create_objects(ctx, job, plan, step, attempt + 1, shared=True)
                sst.update(state=StageState.RUNNING, attempts=ch.attempt_of(new))
                sst.pop("message", None)
                return _STAY
            total = attempt
            sst.update(
                state=StageState.FAILED,
                message=f"{what} failed after {total} attempt{'s' if total != 1 else ''}: {why}",
                completionTime=ctx.stamp,
            )
            return _FAILED

        await self._suspend(ctx, job, child)
        if ch.is_suspended(child):
            if job.spec.suspend:
                sst["state"] = StageState.SUSPENDED
                sst["message"] = "suspended (spec.suspend)"
            else:
                sst["state"] = StageState.RUNNING
                queue = job.spec.scheduling.queue_name
                sst["message"] = f"waiting for admission by Kueue queue {queue}" if queue else "resuming"
        else:
            sst["state"] = StageState.RUNNING
            sst.pop("message", None)
        return _STAY

    async def _suspend(self, ctx: _Ctx, job: FineTuneJob, child: dict[str, Any]) -> None:
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

    async def _serving_previous(self, ctx: _Ctx, job: FineTuneJob, plan: Plan, stages: list[dict[str, Any]]) -> bool:
        """Whether a re-run trains while the Deployment still serves the previous run's model.

        A new run keeps the serve stage's status (it was started) and resets the others, so "serve started,
        an earlier step not done" means exactly that. The Ready condition and the endpoint then stay.
        """
        idx = next((i for i, s in enumerate(plan.steps) if s.kind == "serve"), None)
        if idx is None or int(stages[idx].get("attempts") or 0) == 0:
            return False
        if all(s.get("state") == StageState.SUCCEEDED for s in stages[:idx]):
            return False
        wl = plan.steps[idx].workload
        dep = await self.kube.get(wl["apiVersion"], wl["kind"], ctx.namespace, wl["metadata"]["name"])
        return (
            dep is not None
            and ch.is_ours(dep, ctx.uid)
            and int((dep.get("spec") or {}).get("replicas") or 0) > 0
            and ch.is_available(dep)
        )

    async def _roll(self, ctx: _Ctx, job: FineTuneJob, found: dict[str, Any], rendered: Mapping[str, Any]) -> Any:
        """Patch the existing Deployment to the new run's pod template (same object, same uid, same Service).

        Kubernetes then rolls the pods with the rendered strategy (surge 1, maxUnavailable 0): the previous
        model answers until a new pod is ready. Patching instead of re-creating is what keeps it available.
        Keys the new template no longer has are removed (a merge patch alone would keep them).
        """
        meta = found["metadata"]
        old_tpl = (found.get("spec") or {}).get("template") or {}
        patch = {
            "metadata": {"annotations": {c.ANNOTATION_RUN: job.spec.run_id}},
            "spec": {"template": _with_deletions(old_tpl, copy.deepcopy(rendered["spec"]["template"]))},
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

    async def _serve(self, ctx: _Ctx, job: FineTuneJob, step: Step, sst: dict[str, Any]) -> tuple[bool, bool]:
        """Ensure the vLLM Deployment and Service; scale to ``serve.replicas``; (serving, rolling).

        ``spec.suspend`` while serving scales the Deployment to 0 (the GPUs are what suspending frees) and
        resuming scales it back; the endpoint leaves ``status.outputs`` while nothing answers there. After a
        re-run the existing Deployment is rolled to the new model (:meth:`_roll`); ``rolling`` stays True
        until every replica runs it, and ``status.outputs`` keeps the previous run's paths until then.
        """
        deployment: dict[str, Any] | None = None
        existed_before = int(sst.get("attempts") or 0) > 0
        for obj in step.objects:
            meta = obj["metadata"]
            found = await self.kube.get(obj["apiVersion"], obj["kind"], ctx.namespace, meta["name"])
            if found is not None and not ch.is_ours(found, ctx.uid):
                raise _Blocked(f"{obj['kind']} {meta['name']} exists but is not owned by this FineTuneJob", warn=True)
            if found is None:
                await self._accept(ctx)
                found = await self._create(ctx, ch.with_owner(obj, ctx.ftj))
                if existed_before:
                    ctx.events.append(
                        st.Event(
                            "Warning", Reason.CHILD_RECREATED, f"{obj['kind']} {meta['name']} was missing; recreated"
                        )
                    )
            elif (
                obj is step.workload
                and job.spec.run_id
                and ((found["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) != job.spec.run_id)
            ):
                found = await self._roll(ctx, job, found, obj)
            if obj is step.workload:
                deployment = found
        assert deployment is not None
        sst.setdefault("startTime", ctx.stamp)
        sst.update(state=StageState.RUNNING, attempts=max(1, int(sst.get("attempts") or 0)))
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
            sst.update(state=StageState.SUSPENDED, message="suspended (spec.suspend): scaled to 0 replicas")
        elif serving and rolling:
            sst["message"] = f"rolling out the model of run {job.spec.run_id}"
        elif serving:
            sst.pop("message", None)
        else:
            cs = ch.interpret(deployment)
            sst["message"] = cs.message or ("scaled to 0 replicas" if want == 0 else "waiting for the Deployment")
        return serving, rolling

    # ------------------------------------------------------------------------------------------ writes

    async def _start_run(
        self, ctx: _Ctx, spec: Mapping[str, Any], accepted: Mapping[str, Any], old_status: Mapping[str, Any]
    ) -> None:
        """Start the run ``spec.runId`` names: stop the old run, reset the stages, accept the new spec.

        Order matters for crash safety: the status reset (recording ``status.run``) is written before the new
        accepted spec, so an operator stopped in between finds "new run, already reset" and only accepts.
        The previous run's *unfinished* workloads are deleted (they would hold GPUs for a result nobody will
        use, and report progress into the new run's stages); its finished ones are left for inspection and
        go with the FineTuneJob (ownerReferences). The serve stage keeps its status: the Deployment goes on
        serving the previous model, and is rolled to the new one at the serve step (unless the new spec
        disables serving: then the Deployment and Service are deleted).
        """
        run = specs.run_id(spec)
        if old_status.get("run") != run:
            for api, kind, wl_name in self._run_workloads(ctx, accepted, old_status):
                found = await self.kube.get(api, kind, ctx.namespace, wl_name)
                if (
                    found is not None
                    and ch.is_ours(found, ctx.uid)
                    and not found["metadata"].get("deletionTimestamp")
                    and ch.interpret(found).phase not in (ch.Phase.SUCCEEDED, ch.Phase.FAILED)
                ):
                    await self.kube.delete(api, kind, ctx.namespace, wl_name)
            keep = [
                s for s in old_status.get("stages") or [] if s.get("type") == "serve" and int(s.get("attempts") or 0)
            ]
            unserved = False
            if keep and not (spec.get("serve") or {}).get("enabled"):
                # The new run serves nothing: the previous model's server goes now (nobody would manage it).
                for api, kind in (("apps/v1", "Deployment"), ("v1", "Service")):
                    name = str(keep[0].get("workloadName") or "")
                    found = await self.kube.get(api, kind, ctx.namespace, name) if name else None
                    if found is not None and ch.is_ours(found, ctx.uid):
                        await self.kube.delete(api, kind, ctx.namespace, name)
                keep = []
                unserved = True
            generation = ctx.ftj["metadata"].get("generation")
            conditions = [dict(x) for x in old_status.get("conditions") or []]
            # Ready stays while the previous model is served; Failed/Succeeded were about the previous run.
            reset_types = (c.ConditionType.FAILED, c.ConditionType.SUCCEEDED) + (
                (c.ConditionType.READY,) if unserved else ()
            )
            for type_ in reset_types:
                st.set_condition(
                    conditions,
                    type_,
                    False,
                    Reason.RUN_STARTED,
                    f"run {run} started",
                    now=ctx.stamp,
                    generation=generation,
                )
            reset: dict[str, Any] = {
                "run": run,
                "state": c.State.RUNNING,
                "stages": keep,
                "conditions": conditions,
                "reported": None,
                "currentStage": None,
                "progress": None,
                "loss": None,
            }
            if unserved:
                reset["outputs"] = {"endpoint": None}
            patch = {"metadata": {"resourceVersion": ctx.ftj["metadata"].get("resourceVersion")}, "status": reset}
            ctx.ftj = await self.kube.patch(c.API_VERSION, c.KIND, ctx.namespace, ctx.name, patch, subresource="status")
            self._note_own_write(ctx)
            served = " (the previous model is served until the new one is ready)" if keep else ""
            ctx.events.append(st.Event("Normal", Reason.RUN_STARTED, f"run {run} started{served}"))
            self._post(ctx)  # now: if the next write fails, the retry finds the reset done and posts nothing
        patch = {
            "metadata": {
                "resourceVersion": ctx.ftj["metadata"].get("resourceVersion"),
                "annotations": {specs.ANNOTATION_ACCEPTED_SPEC: specs.dump(spec)},
            }
        }
        ctx.ftj = await self.kube.patch(c.API_VERSION, c.KIND, ctx.namespace, ctx.name, patch)
        self._note_own_write(ctx)
        self._post(ctx)

    def _run_workloads(
        self, ctx: _Ctx, accepted: Mapping[str, Any], old_status: Mapping[str, Any]
    ) -> list[tuple[str, str, str]]:
        """(apiVersion, kind, name) of the accepted run's workloads, from its plan (a workload may exist before
        the status recorded it); from the status when the accepted spec no longer renders."""
        try:
            job, key = self._validate(ctx.ftj, accepted, "accepted")
            return [
                (s.workload["apiVersion"], s.workload["kind"], s.workload["metadata"]["name"])
                for s in self._render(key, job).steps
                if s.kind != "serve"
            ]
        except FineTuneError:
            out = []
            for sst in old_status.get("stages") or []:
                kind, name = sst.get("workloadKind"), sst.get("workloadName")
                api = next((a for a, k in ch.PLURALS if k == kind), None)
                if sst.get("type") != "serve" and api and name:
                    out.append((api, str(kind), str(name)))
            return out

    async def _accept(self, ctx: _Ctx) -> None:
        """Record the accepted spec (once, before the first child): later immutable edits are refused."""
        annotations = ctx.ftj["metadata"].get("annotations") or {}
        if specs.ANNOTATION_ACCEPTED_SPEC in annotations:
            return
        patch = {
            "metadata": {
                "resourceVersion": ctx.ftj["metadata"].get("resourceVersion"),
                "annotations": {specs.ANNOTATION_ACCEPTED_SPEC: specs.dump(ctx.ftj.get("spec") or {})},
            }
        }
        updated = await self.kube.patch(c.API_VERSION, c.KIND, ctx.namespace, ctx.name, patch)
        ctx.ftj = updated
        self._note_own_write(ctx)

    async def _create(self, ctx: _Ctx, body: dict[str, Any]) -> dict[str, Any]:
        """Create, or adopt the same-named object when it is ours (a lost response, or a restart)."""
        meta = body["metadata"]
        try:
            created = await self.kube.create(body)
        except AlreadyExists:
            with fresh_reads():
                found = await self.kube.get(body["apiVersion"], body["kind"], ctx.namespace, meta["name"])
            if found is None:  # deleted in between: let the next reconcile create it
                raise _Blocked(
                    f"{body['kind']} {meta['name']} was being replaced", warn=False, retry_after=0.2
                ) from None
            if not ch.is_ours(found, ctx.uid):
                raise _Blocked(
                    f"{body['kind']} {meta['name']} exists but is not owned by this FineTuneJob; it is left alone",
                    warn=True,
                ) from None
            if found["metadata"].get("deletionTimestamp"):
                raise _Blocked(f"waiting for the old {body['kind']} {meta['name']} to be deleted", warn=False) from None
            return found
        metrics.CHILDREN_CREATED.labels(kind=body["kind"]).inc()
        created.setdefault("apiVersion", body["apiVersion"])
        created.setdefault("kind", body["kind"])
        self._note_own_write(ctx, created)
        return created

    async def _create_objects(
        self, ctx: _Ctx, job: FineTuneJob, plan: Plan, step: Step, attempt: int, *, shared: bool
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

    async def _ensure_present(
        self, ctx: _Ctx, plan: Plan, step: Step, sst: Mapping[str, Any], *, shared: bool, recreate_workload: bool
    ) -> None:
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

    def _compose(
        self,
        ctx: _Ctx,
        job: FineTuneJob,
        plan: Plan,
        stages: list[dict[str, Any]],
        summary: st.Summary,
        old_status: Mapping[str, Any],
        spec_cond: tuple[bool, str, str],
    ) -> dict[str, Any]:
        generation = ctx.ftj["metadata"].get("generation")
        conditions = st.build_conditions(
            old_status.get("conditions") or [], summary, now=ctx.stamp, generation=generation
        )
        st.set_condition(conditions, SPEC_ACCEPTED, *spec_cond, now=ctx.stamp, generation=generation)
        old_spec = st.get_condition(old_status, SPEC_ACCEPTED)
        if not spec_cond[0] and (old_spec is None or old_spec.get("message") != spec_cond[2]):
            ctx.events.append(st.Event("Warning", spec_cond[1], spec_cond[2]))

        # Progress columns: the current stage's report, else the latest stage that reported.
        upto = (
            len(stages)
            if summary.current is None
            else next((i + 1 for i, s in enumerate(plan.steps) if s.name == summary.current), len(stages))
        )
        progress = next((s["progress"] for s in reversed(stages[:upto]) if s.get("progress")), None)

        outputs: dict[str, Any] | None = None
        # While the Deployment rolls, the previous run's outputs (if any) are what answers.
        if summary.succeeded and not (summary.rolling and old_status.get("outputs")):
            outputs = {k: v for k, v in plan.outputs.items() if k != "endpoint" and v not in (None, [], "")}
            if summary.serving and plan.outputs.get("endpoint"):
                outputs["endpoint"] = plan.outputs["endpoint"]
        elif old_status.get("outputs"):
            # A new run is under way (training, or the Deployment rolling to its model): the previous run's
            # results are still what exists and what answers; they switch once the new model serves.
            outputs = dict(old_status["outputs"])
            if not (summary.serving or summary.serving_previous):
                outputs.pop("endpoint", None)
        current_stage = summary.current or (plan.steps[-1].name if summary.succeeded and plan.steps else None)
        new = {
            "observedGeneration": generation,
            "run": job.spec.run_id,
            "state": st.summary_state(summary),
            "currentStage": current_stage,
            "progress": st.format_progress(progress),
            "loss": st.format_loss(progress),
            "conditions": conditions,
            "stages": stages,
            "outputs": outputs,
        }
        self._observe_durations(old_status, stages)
        return new

    def _observe_durations(self, old_status: Mapping[str, Any], stages: list[dict[str, Any]]) -> None:
        before = {s.get("name"): s.get("state") for s in old_status.get("stages") or []}
        for sst in stages:
            if sst.get("state") == StageState.SUCCEEDED and before.get(sst.get("name")) != StageState.SUCCEEDED:
                start, end = _parse_time(sst.get("startTime")), _parse_time(sst.get("completionTime"))
                if start is not None and end is not None and end >= start:
                    metrics.STAGE_DURATION.labels(type=str(sst.get("type"))).observe(end - start)

    async def _invalid(self, ctx: _Ctx, message: str) -> float | None:
        """An invalid spec: condition Failed/InvalidSpec with the whole message, a Warning event, no children."""
        old_status: dict[str, Any] = ctx.ftj.get("status") or {}
        generation = ctx.ftj["metadata"].get("generation")
        summary = st.Summary(invalid=message)
        conditions = st.build_conditions(
            old_status.get("conditions") or [], summary, now=ctx.stamp, generation=generation
        )
        st.set_condition(
            conditions, SPEC_ACCEPTED, False, Reason.INVALID_SPEC, message, now=ctx.stamp, generation=generation
        )
        new = {
            "observedGeneration": generation,
            "state": c.State.FAILED,
            "conditions": conditions,
            "stages": old_status.get("stages") or [],
            "currentStage": old_status.get("currentStage"),
        }
        old_failed = st.get_condition(old_status, c.ConditionType.FAILED) or {}
        if old_failed.get("reason") != Reason.INVALID_SPEC or old_failed.get("message") != message:
            ctx.events.append(st.Event("Warning", Reason.INVALID_SPEC, message))
        await self._write(ctx, old_status, new)
        return None

    async def _write(self, ctx: _Ctx, old_status: Mapping[str, Any], new_status: dict[str, Any]) -> None:
        """Write ``status`` if it changed (progress-only changes at most every ``progress_interval``)."""
        key = (ctx.namespace, ctx.name)
        new_status = _clean(new_status)
        self.states[key] = str(new_status.get("state") or c.State.PENDING)
        old_cmp = _clean({k: old_status.get(k) for k in new_status})
        removed = [
            k for k in ("outputs", "progress", "loss", "currentStage") if k in old_status and k not in new_status
        ]
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
        patch["status"] = _with_deletions(old_cmp, {**new_status, **dict.fromkeys(removed)})
        updated = await self.kube.patch(c.API_VERSION, c.KIND, ctx.namespace, ctx.name, patch, subresource="status")
        ctx.ftj = updated
        self._last_write[ctx.uid] = ctx.now
        self._note_own_write(ctx)
        ctx.events[:0] = st.transition_events(old_status, new_status)
        self._post(ctx)

    def _note_own_write(self, ctx: _Ctx, obj: Mapping[str, Any] | None = None) -> None:
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

    def _post(self, ctx: _Ctx) -> None:
        for event in ctx.events:
            try:
                self.events(ctx.ftj, event.type, event.reason, event.message[:1000])
            except Exception:
                log.warning("could not post event %s for %s/%s", event.reason, ctx.namespace, ctx.name, exc_info=True)
        ctx.events.clear()


_OWN_VERSIONS_MAX = 20_000
#: Validated specs and rendered plans kept (LRU); beyond it a reconcile re-validates and re-renders.
_CACHE_MAX = 512


def _with_deletions(old: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new``: keys of nested objects that disappeared become ``null``
    (a merge patch merges objects, so a key simply left out would stay, e.g. a withdrawn endpoint)."""
    out = dict(new)
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, Mapping):
            out[key] = _with_deletions(before, value)
            out[key].update({k: None for k in before if k not in value})
    return out


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
