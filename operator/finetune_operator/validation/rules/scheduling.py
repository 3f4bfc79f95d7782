"""Scheduling: queue, priority class, node selector, tolerations and node affinity, as the Pod API would check
them, for the job's defaults (``spec.scheduling``) and each step's own block (stages, download, merge, serve)."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import patterns
from finetune_operator.api.types import Affinity, NodeSelectorTerm, SchedulingSpec, StepScheduling
from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.words import join


def _blocks(ctx: Context) -> Iterator[tuple[str, SchedulingSpec | StepScheduling]]:
    """Every scheduling block with its path: the job's, then each step's."""
    spec = ctx.spec
    yield "spec.scheduling", spec.scheduling
    if spec.model is not None and spec.model.download_scheduling is not None:
        yield "spec.model.downloadScheduling", spec.model.download_scheduling
    for i, stage in ctx.stages():
        if stage.scheduling is not None:
            yield f"spec.stages[{i}].scheduling", stage.scheduling
    if spec.merge is not None and spec.merge.scheduling is not None:
        yield "spec.merge.scheduling", spec.merge.scheduling
    if spec.serve is not None and spec.serve.scheduling is not None:
        yield "spec.serve.scheduling", spec.serve.scheduling


@rule
def scheduling_fields_valid(ctx: Context) -> Iterator[FieldError]:
    sched = ctx.spec.scheduling
    if sched.queue_name is not None and not patterns.is_label_value(sched.queue_name):
        yield FieldError(
            "spec.scheduling.queueName", "must be a valid label value (it becomes the kueue.x-k8s.io/queue-name label)"
        )
    for base, block in _blocks(ctx):
        yield from _block_errors(base, block)


def _block_errors(base: str, block: SchedulingSpec | StepScheduling) -> Iterator[FieldError]:
    prio = block.priority_class_name
    if prio is not None and not patterns.DNS_SUBDOMAIN_RE.match(prio):
        yield FieldError(f"{base}.priorityClassName", "must be a DNS-1123 subdomain")
    for key, value in (block.node_selector or {}).items():
        where = join(f"{base}.nodeSelector", key)
        if not patterns.is_label_key(key):
            yield FieldError(
                where, "invalid label key (optional DNS prefix and '/', then a name of at most 63 characters)"
            )
        if not patterns.is_label_value(value):
            yield FieldError(where, "must be a valid label value")
    for j, tol in enumerate(block.tolerations or []):
        if tol is None:
            continue
        path = f"{base}.tolerations[{j}]"
        if tol.operator == "Exists" and tol.value:
            yield FieldError(f"{path}.value", "must be empty when operator is Exists")
        if not tol.key and (tol.operator or "Equal") != "Exists":
            yield FieldError(f"{path}.operator", "must be Exists when key is empty")
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            yield FieldError(f"{path}.tolerationSeconds", "only applies to effect NoExecute")
    if block.affinity is not None:
        yield from _affinity_errors(f"{base}.affinity", block.affinity)


def _affinity_errors(base: str, affinity: Affinity) -> Iterator[FieldError]:
    """Node selector requirements as the API server checks them (values by operator, label keys)."""
    node = affinity.node_affinity
    if node is None:
        return
    terms: list[tuple[str, NodeSelectorTerm | None]] = []
    required = node.required_during_scheduling_ignored_during_execution
    req_path = f"{base}.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
    if required is not None:
        terms += [(f"{req_path}[{t}]", term) for t, term in enumerate(required.node_selector_terms or [])]
    pref_path = f"{base}.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
    for p, pref in enumerate(node.preferred_during_scheduling_ignored_during_execution or []):
        if pref is not None:
            terms.append((f"{pref_path}[{p}].preference", pref.preference))
    for path, term in terms:
        for r, req in enumerate((term.match_expressions if term is not None else None) or []):
            if req is None:
                continue
            where = f"{path}.matchExpressions[{r}]"
            if req.key and not patterns.is_label_key(req.key):
                yield FieldError(f"{where}.key", "invalid label key")
            values = req.values or []
            if req.operator in ("In", "NotIn") and not values:
                yield FieldError(f"{where}.values", f"must not be empty with operator {req.operator}")
            elif req.operator in ("Exists", "DoesNotExist") and values:
                yield FieldError(f"{where}.values", f"must be empty with operator {req.operator}")
            elif req.operator in ("Gt", "Lt") and (len(values) != 1 or not values[0].lstrip("-").isdigit()):
                yield FieldError(f"{where}.values", f"must be a single integer with operator {req.operator}")
