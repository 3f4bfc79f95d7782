"""The models a stage names besides the one it trains: PPO's reward model, a reference, the merged stage.

Decisions:

- ``rewardModel`` is required for ``ppo`` and refused elsewhere (LLaMA-Factory: "`reward_model` is necessary for
  PPO training"); it names an earlier ``rm`` stage or a volume, never both.
- ``reference`` applies to ``ppo``, ``dpo`` and ``kto`` (LLaMA-Factory's ``ref_model``); a reference-free
  preference loss (``pref_loss`` orpo or simpo) has no use for one.
- ``ppo`` refuses evaluation (``val_size``, ``eval_dataset``, ``do_eval``) and ``load_best_model_at_end``
  (also refused for ``rm``), as LLaMA-Factory does only after loading the model.
- ``merge.stage`` names a stage of the job (an ``rm`` stage too: that is asking for it).
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.errors import FieldError
from finetune_operator.render import chain as walker
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.words import hint

_REF_TYPES = {"rewardModel": ("ppo",), "reference": ("ppo", "dpo", "kto")}
_PPO_REFUSED = {
    "val_size": "PPO does not support an evaluation dataset",
    "eval_dataset": "PPO does not support an evaluation dataset",
    "do_eval": "PPO training does not support evaluation: evaluate in an sft stage",
    "load_best_model_at_end": "rm and ppo stages do not support load_best_model_at_end",
}


@rule
def stage_model_refs(ctx: Context) -> Iterator[FieldError]:
    pairs = ctx.stages()
    stages = [s for _, s in pairs]
    for pos, (i, stage) in enumerate(pairs):
        for key, allowed in _REF_TYPES.items():
            ref = stage.reward_model if key == "rewardModel" else stage.reference
            path = f"spec.stages[{i}].{key}"
            if ref is None:
                if key == "rewardModel" and stage.type == "ppo":
                    yield FieldError(
                        path, "a ppo stage needs a reward model: an earlier rm stage ({stage: rm}) or a volume"
                    )
                continue
            if stage.type is not None and stage.type not in allowed:
                yield FieldError(path, f"applies to {' and '.join(allowed)} stages only, not {stage.type}")
                continue
            if (ref.stage is None) == (ref.volume is None):
                yield FieldError(path, "set exactly one of stage and volume")
                continue
            if ref.stage is not None:
                found, why = walker.resolve_earlier(stages, pos, ref.stage, f"{key}.stage")
                if found is None:
                    yield FieldError(f"{path}.stage", why)
                elif key == "rewardModel" and stages[found].type != "rm":
                    yield FieldError(
                        f"{path}.stage",
                        f"stage {ref.stage!r} is not an rm stage: a reward model comes from an rm stage",
                    )
            loss = (stage.args or {}).get("pref_loss")
            if key == "reference" and stage.type == "dpo" and loss in ("orpo", "simpo"):
                yield FieldError(path, f"pref_loss {loss} is reference-free: remove the reference")


@rule
def ppo_args_supported(ctx: Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        if stage.type not in ("ppo", "rm"):
            continue
        args = stage.args or {}
        for key, why in _PPO_REFUSED.items():
            if stage.type == "rm" and key != "load_best_model_at_end":
                continue
            if key in args and args[key] not in (None, False, 0, 0.0):
                yield FieldError(f"spec.stages[{i}].args.{key}", why)


@rule
def merge_stage_known(ctx: Context) -> Iterator[FieldError]:
    merge = ctx.spec.merge
    name = merge.stage if merge is not None else None
    if name is None:
        return
    names = [s.name for _, s in ctx.stages() if s.name is not None]
    if name not in names:
        yield FieldError("spec.merge.stage", f"{name!r} is not a stage of this job{hint(name, names)}")
