"""Backend: what a backend's workload API cannot express is refused here, not by the API server mid-pipeline."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule


@rule
def backend_fields_fit(ctx: Context) -> Iterator[FieldError]:
    """``trainjob``: Trainer v2 requires RFC 1035 TrainJob names (starting with a letter; the TrainJob is named
    after the FineTuneJob), and its runtime patches cannot set ``priorityClassName`` or ``schedulerName`` (the
    runtime owns them). ``trainingRuntime`` only means something to ``trainjob``.
    """
    backend = ctx.spec.backend
    if backend == "trainjob":
        name = ctx.metadata.name
        if name and not name[0].isalpha():
            yield FieldError(
                "metadata.name", "must start with a letter with backend trainjob (Trainer v2 needs RFC 1035 names)"
            )
        sched = ctx.spec.scheduling
        for key, value in (("priorityClassName", sched.priority_class_name), ("schedulerName", sched.scheduler_name)):
            if value:
                yield FieldError(
                    f"spec.scheduling.{key}",
                    "cannot be set with backend trainjob: the TrainJob's runtime decides it (set it in the "
                    "ClusterTrainingRuntime, or use Kueue's priority classes)",
                )
        for i, stage in ctx.stages():
            if stage.scheduling is not None and stage.scheduling.priority_class_name:
                yield FieldError(
                    f"spec.stages[{i}].scheduling.priorityClassName",
                    "cannot be set with backend trainjob: the TrainJob's runtime decides it",
                )
    elif ctx.spec.training_runtime is not None:
        yield FieldError("spec.trainingRuntime", f"is only used by backend trainjob, not {backend or 'the default'}")
