"""Stages: DeepSpeed settings, the datasets each stage trains on, LoRA settings and the adapter chain.

Decisions:

- ``kto`` stages take plain (non-ranking) datasets with a ``columns.ktoTag`` boolean column (LLaMA-Factory
  loads kto data with ``stage="kto"`` and refuses ranking data); ``rm``/``dpo`` need ``ranking: true``.
- ``nodes > 1`` with backend ``job`` is valid: it becomes an Indexed Job with a headless Service.
- ``startFrom`` names ``base`` or an earlier stage (no cycles); an ``rm`` stage is skipped by default.
- A ``full``/``freeze`` stage cannot start from a LoRA stage, and a ``qlora`` or ZeRO-3 LoRA stage continues the
  single earlier adapter: the walk is :func:`finetune_operator.render.chain.walk`, shared with the renderer.
- ``qlora`` with DeepSpeed ZeRO-3 is valid: LLaMA-Factory supports 4-bit bitsandbytes models under ZeRO-3
  (it refuses only 8-bit, HQQ and EETQ there).
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api import patterns
from finetune_operator.api.types import ADAPTER_METHODS, PREFERENCE_STAGES
from finetune_operator.errors import FieldError
from finetune_operator.render import chain as walker
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.words import hint


@rule
def offload_needs_zero(ctx: Context) -> Iterator[FieldError]:
    """DeepSpeed offloads ZeRO-partitioned state: with ZeRO stage 0 there is nothing to offload."""
    for i, stage in ctx.stages():
        if stage.deepspeed is not None and stage.deepspeed.offload is True and walker.zero_stage(stage) == 0:
            yield FieldError(
                f"spec.stages[{i}].deepspeed.offload", "needs zeroStage 1, 2 or 3 (ZeRO stage 0 partitions nothing)"
            )


@rule
def stage_datasets_declared(ctx: Context) -> Iterator[FieldError]:
    declared = ctx.datasets_by_name()
    for i, stage in ctx.stages():
        if stage.datasets is None:
            continue
        seen: set[str] = set()
        for j, ref in enumerate(stage.datasets):
            path = f"spec.stages[{i}].datasets[{j}]"
            if ref not in declared:
                yield FieldError(path, f"undeclared dataset {ref!r}: not in spec.datasets{hint(ref, declared)}")
            elif ref in seen:
                yield FieldError(path, f"dataset {ref!r} is listed twice")
            seen.add(ref)


@rule
def stage_data_matches_type(ctx: Context) -> Iterator[FieldError]:
    """rm/dpo train on preference pairs; pt/sft/kto refuse them (LLaMA-Factory's loader raises late)."""
    declared = ctx.datasets_by_name()
    for i, stage in ctx.stages():
        stype = stage.type
        if stype is None or stage.datasets is None:
            continue
        for j, ref in enumerate(stage.datasets):
            ds = declared.get(ref)
            if ds is None:
                continue
            ranking = ds.ranking is True
            path = f"spec.stages[{i}].datasets[{j}]"
            if stype in PREFERENCE_STAGES and not ranking:
                yield FieldError(
                    path,
                    f"stage type {stype} needs ranking data (preference pairs); dataset {ref!r} "
                    "is not ranking: set ranking: true with chosen/rejected columns",
                )
            elif stype not in PREFERENCE_STAGES and ranking:
                yield FieldError(
                    path,
                    f"stage type {stype} cannot train on ranking data (dataset {ref!r} has "
                    "ranking: true); use it in a dpo or rm stage",
                )
            if stype == "kto" and not ranking and not (ds.columns is not None and ds.columns.kto_tag):
                yield FieldError(
                    path, f"stage type kto needs a boolean label column: set columns.ktoTag on dataset {ref!r}"
                )


@rule
def lora_block_needs_adapter_method(ctx: Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        if stage.lora is not None and stage.method not in ADAPTER_METHODS:
            yield FieldError(
                f"spec.stages[{i}].lora",
                f"lora settings apply to methods lora and qlora only, not {stage.method!r}: "
                "remove lora or change method",
            )


@rule
def lora_target_names_modules(ctx: Context) -> Iterator[FieldError]:
    """``all``, ``q_proj,v_proj`` or a list of module names (the CRD checks the string form with a pattern)."""
    for i, stage in ctx.stages():
        target = stage.lora.target if stage.lora is not None else None
        path = f"spec.stages[{i}].lora.target"
        if isinstance(target, str) and not all(patterns.LORA_MODULE_RE.match(t) for t in target.split(",")):
            yield FieldError(
                path, f"{target!r} is not 'all' or a comma-separated list of module names (no spaces or empty names)"
            )
        elif isinstance(target, list):
            if not target:
                yield FieldError(path, "must name at least one module (or use 'all')")
            for j, name in enumerate(target):
                if not patterns.LORA_MODULE_RE.match(name):
                    yield FieldError(f"{path}[{j}]", f"{name!r} is not a module name")


@rule
def stage_chain_is_loadable(ctx: Context) -> Iterator[FieldError]:
    """What LLaMA-Factory can start each stage from, given the stages before it (the renderer's walk)."""
    walked, index = ctx.chain()
    stages = ctx.stages()
    for problem in walked.problems:
        method = stages[problem.index][1].method
        path = f"spec.stages[{index[problem.index]}].method"
        if problem.problem is walker.Problem.BAD_REFERENCE:
            yield FieldError(f"spec.stages[{index[problem.index]}].startFrom", problem.message)
        elif problem.problem is walker.Problem.FULL_AFTER_LORA:
            yield FieldError(
                path,
                f"a {method} stage cannot start from the LoRA adapters of earlier stages (LLaMA-Factory loads "
                "adapters only for LoRA training): use method lora, or put full/freeze stages first (or start it "
                "from a full model with startFrom)",
            )
        else:
            why = "qlora (4-bit base)" if method == "qlora" else "ZeRO-3"
            yield FieldError(
                path,
                f"a {why} stage can only continue a single earlier adapter (LLaMA-Factory cannot create a new "
                f"adapter upon a quantized or partitioned model), but {problem.stacked} are stacked before it",
            )
