"""The stage graph and its adapter chain: what each training stage starts from. The one implementation.

Both consumers walk the stages through :func:`walk`: the renderer (:func:`finetune_operator.render.llamafactory.chain`
turns stage indexes into paths and raises :class:`~finetune_operator.errors.RenderError` on a problem) and
validation (``finetune_operator.validation.rules.stages`` turns each problem into a field error, and the final
adapters into the serve-without-merge check). ``tests/test_adapter_chain.py`` proves the two agree.

What a stage starts from (the graph):

* ``startFrom`` names it: ``base`` (the base model), or an earlier stage (its *result*: model plus adapters);
* by default, the nearest earlier stage that is not ``rm`` (the base model for the first): linear chaining,
  except that a reward model (a value head scoring answers) is never stacked into a policy; only a ``ppo``
  stage consumes it, through ``rewardModel``.
* Stages run in list order and references point only backwards, so the graph has no cycles; a reference to
  itself, a later stage or an unknown name is a :attr:`Problem.BAD_REFERENCE`.

The merge (and serving) takes the result of ``merge.stage``, else of the last stage that is not ``rm``.

The rules for a stage's result (LLaMA-Factory's, see :mod:`finetune_operator.render.llamafactory` for the why):

* LoRA after LoRA stacks a new adapter on the earlier ones.
* A stage that cannot create a new adapter (``qlora``: 4-bit base; DeepSpeed ZeRO-3: partitioned weights)
  continues the single adapter it starts from; its output replaces it. After two or more adapters: a problem.
* A full/freeze stage restarts the chain from its own output; starting from adapters: a problem.

The walk reads only ``name``, ``type``, ``startFrom``, ``method``, ``lora.rank`` and ``deepspeed.zeroStage``
and takes their defaults from the types (:func:`lora_of`, :func:`zero_stage`), so a leniently parsed stage
(validation) walks like a valid one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from finetune_operator.api.types import ADAPTER_METHODS, LoraSpec, StageSpec

__all__ = [
    "BASE",
    "ChainProblem",
    "Problem",
    "Result",
    "StageLink",
    "Walk",
    "continues_adapter",
    "lora_of",
    "resolve_earlier",
    "walk",
    "zero_stage",
]


def lora_of(stage: StageSpec) -> LoraSpec:
    """The stage's LoRA settings with the API defaults filled in (rank 8, target ``all``, ...)."""
    return stage.lora if stage.lora is not None else LoraSpec()


def zero_stage(stage: StageSpec) -> int | None:
    """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
    return stage.deepspeed.zero_stage if stage.deepspeed is not None else None


def continues_adapter(stage: StageSpec) -> bool:
    """True when LLaMA-Factory cannot stack a new adapter for this stage (quantized or ZeRO-3 weights)."""
    return stage.method == "qlora" or zero_stage(stage) == 3


#: ``startFrom: base``: the base model (``spec.model``), no adapters.
BASE = "base"
#: Stage types whose output is not a policy: never chained or merged unless named.
NON_POLICY_TYPES: frozenset[str] = frozenset({"rm"})


class Problem(Enum):
    """Why a stage cannot start from what it names."""

    FULL_AFTER_LORA = "full_after_lora"
    """A full/freeze stage that starts from LoRA adapters (LLaMA-Factory loads adapters only for LoRA)."""
    CONTINUE_MANY = "continue_many"
    """A qlora/ZeRO-3 stage that starts from two or more stacked adapters (it can only continue one)."""
    BAD_REFERENCE = "bad_reference"
    """``startFrom`` names this stage itself, a later stage, an unknown stage, or an ambiguous ``base``."""


@dataclass(frozen=True)
class ChainProblem:
    index: int
    """Index of the offending stage in ``spec.stages``."""
    problem: Problem
    stacked: int
    """Number of adapters stacked before the stage."""
    message: str = ""
    """The reason, for :attr:`Problem.BAD_REFERENCE`."""


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
    source: int | None = None
    """The stage it starts from (None: the base model)."""


@dataclass(frozen=True)
class Result:
    """What a stage produces: a full model (stage index, None: the base) and adapters on it, in order."""

    base: int | None = None
    adapters: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()


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
    results: tuple[Result, ...] = ()
    """Each stage's result, by index (for the models a stage names: reward model, reference)."""


def _name(stage: StageSpec, i: int) -> str:
    return stage.name if isinstance(stage.name, str) else f"#{i}"


def resolve_earlier(stages: Sequence[StageSpec], index: int, name: str, what: str) -> tuple[int | None, str]:
    """The index of the earlier stage ``name`` that stage ``index`` refers to, or ``(None, reason)``."""
    if name == _name(stages[index], index):
        return None, f"{what} {name!r} is this stage itself (a cycle): name an earlier stage"
    for j in range(index):
        if _name(stages[j], j) == name:
            return j, ""
    if any(_name(stages[j], j) == name for j in range(index + 1, len(stages))):
        return None, f"{what} {name!r} runs after this stage (stages run in list order): name an earlier stage"
    known = ", ".join(repr(_name(stages[j], j)) for j in range(index)) or "none"
    return None, f"{what} {name!r} is not a stage of this job (earlier stages: {known})"


def _default_source(stages: Sequence[StageSpec], index: int) -> int | None:
    for j in range(index - 1, -1, -1):
        if stages[j].type not in NON_POLICY_TYPES:
            return j
    return None


def _final(stages: Sequence[StageSpec], merge_stage: str | None) -> int | None:
    """Index of the stage whose result the pipeline ends with (None: no stage)."""
    if merge_stage is not None:
        for j, stage in enumerate(stages):
            if stage.name == merge_stage:
                return j
    policy = [j for j, s in enumerate(stages) if s.type not in NON_POLICY_TYPES]
    if policy:
        return policy[-1]
    return len(stages) - 1 if stages else None


def walk(stages: Sequence[StageSpec], merge_stage: str | None = None) -> Walk:
    """Walk the stage graph (see the module docstring); problems are collected, never raised. A stage with a
    bad reference is walked from the base model, so that every other problem is still found."""
    links: list[StageLink] = []
    results: list[Result] = []
    problems: list[ChainProblem] = []
    for i, stage in enumerate(stages):
        source: int | None
        start = stage.start_from
        if start is None:
            source = _default_source(stages, i)
        elif start == BASE:
            source = None
            if any(_name(s, j) == BASE for j, s in enumerate(stages)):
                problems.append(
                    ChainProblem(i, Problem.BAD_REFERENCE, 0, "ambiguous: 'base' is also a stage name; rename it")
                )
        else:
            source, why = resolve_earlier(stages, i, start, "startFrom")
            if source is None:
                problems.append(ChainProblem(i, Problem.BAD_REFERENCE, 0, why))
        inp = results[source] if source is not None else Result()
        if stage.method not in ADAPTER_METHODS:
            if inp.adapters:
                problems.append(ChainProblem(i, Problem.FULL_AFTER_LORA, len(inp.adapters)))
            links.append(StageLink(i, inp.base, (), False, source))
            results.append(Result(i))
            continue
        rank = lora_of(stage).rank
        if inp.adapters and continues_adapter(stage):
            if len(inp.adapters) != 1:
                problems.append(ChainProblem(i, Problem.CONTINUE_MANY, len(inp.adapters)))
            links.append(StageLink(i, inp.base, inp.adapters, False, source))
            results.append(Result(inp.base, (i,), (max(rank, *inp.ranks),)))
            continue
        links.append(StageLink(i, inp.base, inp.adapters, bool(inp.adapters), source))
        results.append(Result(inp.base, (*inp.adapters, i), (*inp.ranks, rank)))
    last = _final(stages, merge_stage)
    final = results[last] if last is not None else Result()
    return Walk(tuple(links), final.base, final.adapters, final.ranks, tuple(problems), tuple(results))
