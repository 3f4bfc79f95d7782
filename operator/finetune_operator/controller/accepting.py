"""Accepting a spec or a run: which spec the pipeline runs, and whether there is anything to do.

Decisions that live here (:meth:`Accepting._decide`, first thing every reconcile does):

* **Nothing is decided from status** here: a failed or finished pipeline is recognised from its children by
  the walk over the steps (status may be written by worker pods, so it is a record, not evidence).
* **A new ``spec.runId``** re-runs the pipeline, even a failed or finished one (:meth:`Accepting._start_run`).
* **Which spec runs**: before the first child, the current one (recorded in annotation
  ``finetune.dev/accepted-spec`` by :meth:`Accepting._accept`); afterwards the accepted one with the current
  values of the mutable fields (see :mod:`finetune_operator.controller.spec`); an invalid or immutable edit is
  reported in ``SpecAccepted`` and otherwise ignored.
* **Validation and rendering are cached** by the object's identity and generation: a reconcile that finds
  nothing changed costs no validation and no render.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from finetune_operator.api import constants as c
from finetune_operator.api.constants import Reason
from finetune_operator.api.types import FineTuneJob, FineTuneJobStatus
from finetune_operator.controller import children as ch
from finetune_operator.controller import spec as specs
from finetune_operator.controller import status as st
from finetune_operator.controller.context import Ctx, SpecVerdict
from finetune_operator.controller.writing import StatusWriter
from finetune_operator.errors import FineTuneError, SpecError
from finetune_operator.render.plan import Plan

#: Validated specs and rendered plans kept (LRU); beyond it a reconcile re-validates and re-renders.
_CACHE_MAX: Final = 512


class Decision(enum.Enum):
    """What the acceptance step decided for this reconcile."""

    #: Drive the plan of the accepted spec.
    DRIVE = "drive"
    #: A new run was set up: drive it from a fresh read at once.
    RUN_STARTED = "run-started"
    #: The spec is invalid: reported in status, no children.
    INVALID = "invalid"


@dataclass
class Acceptance:
    decision: Decision
    job: FineTuneJob | None = None
    plan: Plan | None = None
    verdict: SpecVerdict = field(default_factory=SpecVerdict)


class Accepting(StatusWriter):
    """Decides which spec (and run) the pipeline runs; records the accepted spec and starts runs."""

    async def _decide(self, ctx: Ctx, old_status: Mapping[str, Any]) -> Acceptance:
        meta = ctx.ftj["metadata"]
        accepted = specs.load((meta.get("annotations") or {}).get(specs.ANNOTATION_ACCEPTED_SPEC))
        spec = ctx.ftj.get("spec") or {}
        # A new spec.runId re-runs the pipeline, even a failed or finished one.
        new_run = accepted is not None and specs.is_new_run(accepted, spec)
        # No shortcut for "Failed" or "Succeeded" read back from status: status can be written by worker pods,
        # so whether the pipeline failed or finished is decided again from its children (see stepping.py).

        verdict = SpecVerdict()
        run_refused: str | None = None
        if new_run and accepted is not None:
            try:
                self._validate(ctx.ftj, spec, "current")
            except SpecError as exc:
                run_refused = f"run {specs.run_id(spec)} is not started: {exc.render()}"
            else:
                await self._start_run(ctx, spec, accepted, old_status)
                return Acceptance(Decision.RUN_STARTED)
        if accepted is None:
            try:
                job, job_key = self._validate(ctx.ftj, spec, "current")
            except SpecError as exc:
                await self._invalid(ctx, exc.render())
                return Acceptance(Decision.INVALID)
        else:
            changed = specs.changed_immutable_fields(accepted, spec)
            # Unchanged immutable fields (the usual case): the effective spec is the current one.
            effective, variant = (specs.effective_spec(accepted, spec), "effective") if changed else (spec, "current")
            try:
                job, job_key = self._validate(ctx.ftj, effective, variant)
            except SpecError as exc:
                verdict = SpecVerdict(False, Reason.INVALID_SPEC, f"the change is ignored: {exc.render()}")
                try:
                    job, job_key = self._validate(ctx.ftj, accepted, "accepted")
                except SpecError as exc2:
                    await self._invalid(ctx, exc2.render())
                    return Acceptance(Decision.INVALID)
            if changed:
                verdict = SpecVerdict(
                    False,
                    Reason.IMMUTABLE_FIELD,
                    f"{', '.join(changed)} cannot change once the pipeline started; the change is ignored "
                    "(revert it, set a new spec.runId to re-run, or create a new FineTuneJob)",
                )
            if run_refused is not None:
                verdict = SpecVerdict(False, Reason.INVALID_SPEC, run_refused)
        try:
            plan = self._render(job_key, job)
        except FineTuneError as exc:
            await self._invalid(ctx, f"cannot render the pipeline: {exc}")
            return Acceptance(Decision.INVALID)
        return Acceptance(Decision.DRIVE, job, plan, verdict)

    # ------------------------------------------------------------------------------------------ caches

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
        if isinstance(hit, Exception):
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

    # ------------------------------------------------------------------------------------------ writes

    async def _start_run(
        self, ctx: Ctx, spec: Mapping[str, Any], accepted: Mapping[str, Any], old_status: Mapping[str, Any]
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
            keep = [s for s in st.parse_stages(old_status.get("stages")) if s.type == "serve" and s.attempts]
            unserved = False
            if keep and not (spec.get("serve") or {}).get("enabled"):
                # The new run serves nothing: the previous model's server goes now (nobody would manage it).
                for api, kind in (("apps/v1", "Deployment"), ("v1", "Service")):
                    name = keep[0].workload_name or ""
                    found = await self.kube.get(api, kind, ctx.namespace, name) if name else None
                    if found is not None and ch.is_ours(found, ctx.uid):
                        await self.kube.delete(api, kind, ctx.namespace, name)
                keep = []
                unserved = True
            generation = ctx.generation
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
            reset = st.wire(FineTuneJobStatus.model_validate({"run": run, "conditions": conditions}))
            reset.update(state=c.State.RUNNING, stages=[st.wire(s) for s in keep])
            # Explicit nulls: the merge patch deletes what described the previous run.
            reset.update(dict.fromkeys(("reported", "currentStage", "progress", "loss")))
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
        self, ctx: Ctx, accepted: Mapping[str, Any], old_status: Mapping[str, Any]
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
            for sst in st.parse_stages(old_status.get("stages")):
                kind, name = sst.workload_kind, sst.workload_name
                api = next((a for a, k in ch.PLURALS if k == kind), None)
                if sst.type != "serve" and api and name:
                    out.append((api, str(kind), name))
            return out

    async def _accept(self, ctx: Ctx) -> None:
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
