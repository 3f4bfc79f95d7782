"""Datasets: columns and tags that fit the formatting, and the pair columns ranking data needs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule

_ALPACA_ONLY_COLUMNS = ("prompt", "query", "response", "history")
_SHAREGPT_ONLY_COLUMNS = ("messages",)
_MEDIA_COLUMNS = ("images", "videos", "audios")
#: Well-known multimodal templates, suggested first when a template takes no media of a kind.
_SUGGESTED_TEMPLATES = ("qwen2_vl", "qwen3_vl", "llava", "gemma3", "qwen2_audio", "qwen2_omni")


def _suggest(kind: str, template_media: Mapping[str, frozenset[str]]) -> str:
    """A few templates that take ``kind``: well-known ones first, then by name."""
    takers = sorted(name for name, kinds in template_media.items() if kind in kinds)
    ordered = [t for t in _SUGGESTED_TEMPLATES if t in takers] + [t for t in takers if t not in _SUGGESTED_TEMPLATES]
    shown = ", ".join(ordered[:4])
    more = f" and {len(ordered) - 4} more" if len(ordered) > 4 else ""
    return f"{shown}{more}"


@rule
def media_columns_need_a_multimodal_template(ctx: Context) -> Iterator[FieldError]:
    """Images, videos and audios are read only by a template whose multimodal plugin has a placeholder token
    for them (the generated table's ``template_media``). LLaMA-Factory finds out only when a training pod
    tokenises the data ("This model does not support image input"), after the model was downloaded and a GPU
    was scheduled: say it at admission instead, on the column, naming the template."""
    template = ctx.spec.model.template if ctx.spec.model is not None else None
    if not template or template not in ctx.lf.templates:
        return  # missing or unknown: model_template_known (or the shape pass) reports it
    takes = ctx.lf.template_media.get(template, frozenset())
    for i, ds in ctx.datasets():
        cols = ds.columns.model_dump(exclude_none=True) if ds.columns is not None else {}
        for kind in _MEDIA_COLUMNS:
            if kind in cols and kind not in takes:
                reads = f"reads only {', '.join(sorted(takes))}" if takes else "is text-only"
                yield FieldError(
                    f"spec.datasets[{i}].columns.{kind}",
                    f"spec.model.template {template!r} {reads}: LLaMA-Factory refuses {kind} with it; use a "
                    f"multimodal model with a template that takes {kind} "
                    f"({_suggest(kind, ctx.lf.template_media)}), or drop the column",
                )


@rule
def media_folder_has_media_columns(ctx: Context) -> Iterator[FieldError]:
    """``media`` resolves the paths of the images/videos/audios columns: without one it has no use."""
    for i, ds in ctx.datasets():
        cols = ds.columns.model_dump(exclude_none=True) if ds.columns is not None else {}
        if ds.media is not None and not any(c in cols for c in _MEDIA_COLUMNS):
            yield FieldError(
                f"spec.datasets[{i}].media", "set columns.images, columns.videos or columns.audios to use media"
            )


@rule
def stage_media_folders_agree(ctx: Context) -> Iterator[FieldError]:
    """LLaMA-Factory resolves media paths against one ``media_dir`` per run: a stage's datasets share it."""
    by_name = ctx.datasets_by_name()
    for i, stage in ctx.stages():
        folders = {
            (m.claim_name, m.sub_path)
            for n in stage.datasets or []
            if (ds := by_name.get(n)) is not None and (m := ds.media) is not None
        }
        if len(folders) > 1:
            yield FieldError(
                f"spec.stages[{i}].datasets",
                "its datasets have different media folders; LLaMA-Factory resolves media paths against one "
                "folder per stage: put the media in one folder or train them in separate stages",
            )


@rule
def dataset_columns_match_formatting(ctx: Context) -> Iterator[FieldError]:
    for i, ds in ctx.datasets():
        cols = ds.columns.model_dump(exclude_none=True) if ds.columns is not None else {}
        if ds.formatting == "sharegpt":
            for col in _ALPACA_ONLY_COLUMNS:
                if col in cols:
                    yield FieldError(
                        f"spec.datasets[{i}].columns.{col}",
                        f"column {col!r} is for alpaca data; sharegpt data uses 'messages'",
                    )
        elif ds.formatting == "alpaca":
            for col in _SHAREGPT_ONLY_COLUMNS:
                if col in cols:
                    yield FieldError(
                        f"spec.datasets[{i}].columns.{col}",
                        "column 'messages' is for sharegpt data: set formatting: sharegpt",
                    )
            if ds.tags is not None:
                yield FieldError(
                    f"spec.datasets[{i}].tags",
                    "tags apply to sharegpt data only: set formatting: sharegpt or remove tags",
                )


@rule
def ranking_dataset_has_pair_columns(ctx: Context) -> Iterator[FieldError]:
    for i, ds in ctx.datasets():
        if ds.ranking is not True:
            continue
        cols = ds.columns
        for col in ("chosen", "rejected"):
            if not (cols is not None and getattr(cols, col)):
                yield FieldError(
                    f"spec.datasets[{i}].columns.{col}",
                    f"ranking data needs the {col!r} column name (LLaMA-Factory has no default)",
                )
        if cols is not None and cols.kto_tag:
            yield FieldError(
                f"spec.datasets[{i}].columns.ktoTag",
                "ktoTag marks kto data, which is not ranking: drop ranking or ktoTag",
            )
