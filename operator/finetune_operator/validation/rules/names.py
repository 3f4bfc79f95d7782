"""Names: the job's, the namespace's, stage and dataset names, and ``runId``.

Derived child names are hash-truncated (:mod:`finetune_operator.api.naming`), so only the job name itself is
limited: it must be a DNS-1123 label of at most 63 characters because it is also a label value.
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import naming
from finetune_operator.errors import FieldError
from finetune_operator.render import RESERVED_STAGE_NAMES
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule


@rule
def job_name_is_dns_label(ctx: Context) -> Iterator[FieldError]:
    """The job name is a label value (finetune.dev/job, app.kubernetes.io/instance) and a name prefix."""
    name = ctx.metadata.name
    if not isinstance(name, str) or not name:
        return
    if len(name) > naming.MAX_NAME:
        yield FieldError(
            "metadata.name", f"must be at most {naming.MAX_NAME} characters (it is a label value), got {len(name)}"
        )
    elif not naming.is_dns_label(name):
        yield FieldError(
            "metadata.name",
            "must be a DNS-1123 label (lowercase letters, digits and '-', starting "
            "and ending alphanumeric): it names Services and pods",
        )


@rule
def namespace_is_dns_label(ctx: Context) -> Iterator[FieldError]:
    ns = ctx.metadata.namespace
    if isinstance(ns, str) and not naming.is_dns_label(ns):
        yield FieldError("metadata.namespace", "must be a DNS-1123 label")


@rule
def stage_names_unique_and_free(ctx: Context) -> Iterator[FieldError]:
    seen: dict[str, int] = {}
    for i, stage in ctx.stages():
        name = stage.name
        if name is None:
            continue
        if name in RESERVED_STAGE_NAMES:
            yield FieldError(
                f"spec.stages[{i}].name",
                f"{name!r} is reserved for the pipeline's own steps ({', '.join(sorted(RESERVED_STAGE_NAMES))})",
            )
        if name in seen:
            yield FieldError(
                f"spec.stages[{i}].name", f"duplicate stage name {name!r} (also spec.stages[{seen[name]}])"
            )
        else:
            seen[name] = i


@rule
def run_id_is_not_a_folder_name(ctx: Context) -> Iterator[FieldError]:
    """A run writes ``<out>/<job>/<runId>/``: a runId named like a stage or ``merged`` would put the new run
    inside the folder of a run-less run's stage (the layout before the first runId)."""
    run = ctx.spec.run_id
    if run is None:
        return
    stages = {s.name for _, s in ctx.stages()}
    if run in RESERVED_STAGE_NAMES or run in stages:
        yield FieldError("spec.runId", f"{run!r} is a stage or step name; choose another runId (e.g. a date)")


@rule
def dataset_names_unique(ctx: Context) -> Iterator[FieldError]:
    seen: dict[str, int] = {}
    for i, ds in ctx.datasets():
        if ds.name is None:
            continue
        if ds.name in seen:
            yield FieldError(
                f"spec.datasets[{i}].name",
                f"duplicate dataset name {ds.name!r} (also spec.datasets[{seen[ds.name]}])",
            )
        else:
            seen[ds.name] = i
