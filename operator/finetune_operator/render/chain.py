"""The adapter chain: what each training stage starts from. The one implementation of the hardest rule.

Both consumers walk the stages through :func:`walk`: the renderer (:func:`finetune_operator.render.llamafactory.chain`
turns stage indexes into paths and raises :class:`~finetune_operator.errors.RenderError` on a problem) and
validation (``finetune_operator.validation.rules.stages`` turns each problem into a field error, and the final
adapters into the serve-without-merge check). ``tests/test_render_lf.py`` proves the two agree.

The rules (LLaMA-Factory's, see :mod:`finetune_operator.render.llamafactory` for the why):

* LoRA after LoRA stacks a new adapter on the earlier ones.
* A stage that cannot create a new adapter (``qlora``: 4-bit base; DeepSpeed ZeRO-3: partitioned weights)
  continues the single earlier adapter; its output replaces it. After two or more adapters: a problem.
* A full/freeze stage restarts the chain from its own output; after LoRA stages: a problem.

The walk reads only ``method``, ``lora.rank`` and ``deepspeed.zeroStage`` and takes their defaults from the
types (:func:`lora_of`, :func:`zero_stage`), so a leniently parsed stage (validation) walks like a valid one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from finetune_operator.api.types import ADAPTER_METHODS, LoraSpec, StageSpec

__all__ = ["ChainProblem", "Problem", "StageLink", "Walk", "continues_adapter", "lora_of", "walk", "zero_stage"]


def lora_of(stage: StageSpec) -> LoraSpec:
    """The stage's LoRA settings with the API defaults filled in (rank 8, target ``all``, ...)."""
    return stage.lora if stage.lora is not None else LoraSpec()


def zero_stage(stage: StageSpec) -> int | None:
    """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
    return stage.deepspeed.zero_stage if stage.deepspeed is not None else None


def continues_adapter(stage: StageSpec) -> bool:
    """True when LLaMA-Factory cannot stack a new adapter for this stage (quantized or ZeRO-3 weights)."""
    return stage.method == "qlora" or zero_stage(stage) == 3


class Problem(Enum):
    """Why a stage cannot start from what the stages before it produce."""

    FULL_AFTER_LORA = "full_after_lora"
    """A full/freeze stage after LoRA stages (LLaMA-Factory loads adapters only for LoRA training)."""
    CONTINUE_MANY = "continue_many"
    """A qlora/ZeRO-3 stage after two or more stacked adapters (it can only continue one)."""


@dataclass(frozen=True)
class ChainProblem:
    index: int
    """Index of the offending stage in ``spec.stages``."""
    problem: Problem
    stacked: int
    """Number of adapters stacked before the stage."""


@dataclass(frozen=True)
class StageLink:
    """What stage ``index`` starts from, as indexes of earlier stages."""

    index: int
    base: int | None
    """The stage whose output is the full model (the last full/freeze stage), None for the base model."""
    adapters: tuple[int, ...]
    """Stages whose adapters are loaded, in order."""
    create_new_adapter: bool
    """Train a fresh adapter on top of ``adapters`` (False: continue the single earlier adapter, or none)."""


@dataclass(frozen=True)
class Walk:
    links: tuple[StageLink, ...]
    base: int | None
    """The full model the final adapters apply to (None: the base model)."""
    adapters: tuple[int, ...]
    """Stages whose adapters the pipeline ends with, in order."""
    ranks: tuple[int, ...]
    """LoRA rank of each final adapter (a continued adapter keeps the larger rank)."""
    problems: tuple[ChainProblem, ...]


def walk(stages: Sequence[StageSpec]) -> Walk:
    """Walk ``stages`` in order (see the module docstring); problems are collected, never raised."""
    base: int | None = None
    adapters: list[int] = []
    ranks: list[int] = []
    links: list[StageLink] = []
    problems: list[ChainProblem] = []
    for i, stage in enumerate(stages):
        if stage.method not in ADAPTER_METHODS:
            if adapters:
                problems.append(ChainProblem(i, Problem.FULL_AFTER_LORA, len(adapters)))
            links.append(StageLink(i, base, (), False))
            base, adapters, ranks = i, [], []
            continue
        rank = lora_of(stage).rank
        if adapters and continues_adapter(stage):
            if len(adapters) != 1:
                problems.append(ChainProblem(i, Problem.CONTINUE_MANY, len(adapters)))
            links.append(StageLink(i, base, tuple(adapters), False))
            adapters, ranks = [i], [max(rank, *ranks)]
            continue
        links.append(StageLink(i, base, tuple(adapters), bool(adapters)))
        adapters.append(i)
        ranks.append(rank)
    return Walk(tuple(links), base, tuple(adapters), tuple(ranks), tuple(problems))
