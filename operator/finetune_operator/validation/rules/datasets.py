"""Datasets: columns and tags that fit the formatting, and the pair columns ranking data needs."""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule

_ALPACA_ONLY_COLUMNS = ("prompt", "query", "response", "history")
_SHAREGPT_ONLY_COLUMNS = ("messages",)


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
