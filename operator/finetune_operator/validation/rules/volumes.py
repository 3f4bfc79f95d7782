"""Volumes: a ``subPath`` stays inside its claim."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api.types import VolumeRef
from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule


def volume_refs(ctx: Context) -> Iterator[tuple[str, VolumeRef]]:
    """Every volume reference of the spec with its wire path."""
    for key, section in (("model", ctx.spec.model), ("output", ctx.spec.output)):
        if section is not None and section.volume is not None:
            yield f"spec.{key}.volume", section.volume
    for i, ds in ctx.datasets():
        if ds.volume is not None:
            yield f"spec.datasets[{i}].volume", ds.volume


@rule
def sub_paths_stay_inside_volume(ctx: Context) -> Iterator[FieldError]:
    """A subPath is joined under the mount point: an absolute or '..' path would escape it."""
    for path, vol in volume_refs(ctx):
        sub = vol.sub_path
        if sub is None:
            continue
        if sub.startswith("/") or ".." in sub.split("/"):
            yield FieldError(
                f"{path}.subPath", "must be a relative path inside the volume (no leading '/' and no '..')"
            )
        elif "\x00" in sub or "\n" in sub:
            yield FieldError(f"{path}.subPath", "must not contain NUL or newline characters")
