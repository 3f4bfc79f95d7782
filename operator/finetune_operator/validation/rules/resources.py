"""Resources: CPU and memory are Kubernetes quantities."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import patterns
from finetune_operator.api.types import ResourcesSpec, ServeResources
from finetune_operator.errors import FieldError
from finetune_operator.estimate.plan import parse_gib
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule


def _resources(ctx: Context) -> Iterator[tuple[str, ResourcesSpec | ServeResources]]:
    for i, stage in ctx.stages():
        if stage.resources is not None:
            yield f"spec.stages[{i}].resources", stage.resources
    if ctx.spec.merge.resources is not None:
        yield "spec.merge.resources", ctx.spec.merge.resources
    if ctx.spec.serve.resources is not None:
        yield "spec.serve.resources", ctx.spec.serve.resources


@rule
def resource_quantities_valid(ctx: Context) -> Iterator[FieldError]:
    for path, res in _resources(ctx):
        for key in ("cpu", "memory"):
            value = getattr(res, key)
            if isinstance(value, str) and not patterns.is_quantity(value):
                yield FieldError(f"{path}.{key}", f"{value!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
        gpu_memory = getattr(res, "gpu_memory", None)
        if isinstance(gpu_memory, str) and (not patterns.is_quantity(gpu_memory) or parse_gib(gpu_memory) is None):
            yield FieldError(f"{path}.gpuMemory", f"{gpu_memory!r} is not a memory quantity (e.g. '80Gi', '24G')")
