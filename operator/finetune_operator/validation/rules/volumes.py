"""Volumes: a ``subPath`` stays inside its claim; a downloaded model gets a folder of its own."""

from __future__ import annotations

import posixpath
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
        if ds.media is not None:
            yield f"spec.datasets[{i}].media", ds.media
    for i, stage in ctx.stages():
        for key, ref in (("rewardModel", stage.reward_model), ("reference", stage.reference)):
            if ref is not None and ref.volume is not None:
                yield f"spec.stages[{i}].{key}.volume", ref.volume


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


def _folder(sub: str | None) -> str:
    """A subPath as a normalised relative folder ('.' for the claim root)."""
    return posixpath.normpath((sub or "").strip("/") or ".")


def _contains(outer: str, inner: str) -> bool:
    return outer == "." or inner == outer or inner.startswith(outer + "/")


@rule
def downloaded_model_has_its_own_folder(ctx: Context) -> Iterator[FieldError]:
    """With ``model.source`` the download fills ``model.volume`` and replaces an unfinished model folder there:
    that folder must not be the claim root or hold a dataset or the output (they would be in the way, or
    worse, be taken for a half-finished download)."""
    model = ctx.spec.model
    if model is None or model.source is None or model.volume is None:
        return
    claim, folder = model.volume.claim_name, _folder(model.volume.sub_path)
    why = "with model.source the download fills this folder, so it must be a folder of its own"
    if folder == ".":
        yield FieldError("spec.model.volume.subPath", f"{why}, not the claim root of {claim!r}: set a subPath")
        return
    others = [(f"spec.datasets[{i}]", ds.volume) for i, ds in ctx.datasets()]
    if ctx.spec.output is not None:
        others.append(("spec.output", ctx.spec.output.volume))
    for where, vol in others:
        if vol is not None and vol.claim_name == claim and _contains(folder, _folder(vol.sub_path)):
            yield FieldError(
                "spec.model.volume.subPath", f"{why}, but it contains {where} ({claim}/{_folder(vol.sub_path)})"
            )
