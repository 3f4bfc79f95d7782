"""Scheduling: queue, priority class, node selector and tolerations, as the Pod API would check them."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import patterns
from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.words import join


@rule
def scheduling_fields_valid(ctx: Context) -> Iterator[FieldError]:
    sched = ctx.spec.scheduling
    if sched.queue_name is not None and not patterns.is_label_value(sched.queue_name):
        yield FieldError(
            "spec.scheduling.queueName", "must be a valid label value (it becomes the kueue.x-k8s.io/queue-name label)"
        )
    prio = sched.priority_class_name
    if prio is not None and not patterns.DNS_SUBDOMAIN_RE.match(prio):
        yield FieldError("spec.scheduling.priorityClassName", "must be a DNS-1123 subdomain")
    for key, value in sched.node_selector.items():
        where = join("spec.scheduling.nodeSelector", key)
        if not patterns.is_label_key(key):
            yield FieldError(
                where, "invalid label key (optional DNS prefix and '/', then a name of at most 63 characters)"
            )
        if not patterns.is_label_value(value):
            yield FieldError(where, "must be a valid label value")
    for j, tol in enumerate(sched.tolerations):
        if tol is None:
            continue
        path = f"spec.scheduling.tolerations[{j}]"
        if tol.operator == "Exists" and tol.value:
            yield FieldError(f"{path}.value", "must be empty when operator is Exists")
        if not tol.key and (tol.operator or "Equal") != "Exists":
            yield FieldError(f"{path}.operator", "must be Exists when key is empty")
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            yield FieldError(f"{path}.tolerationSeconds", "only applies to effect NoExecute")
