"""What a ``ppo`` stage's trainer process needs to run LLaMA-Factory 0.9.5's PPO with the old trl (:mod:`.ppo_runtime`).

Four shims, applied by :mod:`.lfentry` in a ``ppo`` stage's trainer processes only, each limited to what is
missing (a release that fixes the cause makes it a no-op) and each proven by the real SFT → RM → PPO run
(tests/test_pipeline_rlhf.py):

1. **DPO/KTO stand-ins.** LLaMA-Factory's ``run_exp`` module imports every workflow up front, and its DPO and KTO
   trainers import names the old trl lacks (``trl.models.utils.prepare_fsdp``, a transformers mapping removed in
   v5). A PPO run never calls them, so :func:`install` registers stand-in modules for
   ``llamafactory.train.dpo``/``.kto`` whose ``run_dpo``/``run_kto`` raise; nothing of LLaMA-Factory is
   changed.
2. **Tokenizers' ``additional_special_tokens_ids``.** transformers 5 renamed it ``extra_special_tokens_ids``
   (huggingface/transformers#43689); LLaMA-Factory's PPO trainer still reads the old name (for the generation
   stop tokens). The old name is added back as a read-only alias of the new one.
3. **``CustomPPOTrainer.processing_class``.** transformers' ``Trainer._save`` reads ``self.processing_class``,
   set by ``Trainer.__init__``, which LLaMA-Factory's PPO trainer never calls (it is initialised as trl's
   ``PPOTrainer``, which keeps the tokenizer as ``self.tokenizer``): saving the trained adapter fails with an
   ``AttributeError``. The attribute is added as a read-only alias of ``self.tokenizer``.
4. **The policy adapter stays trainable when the reward adapter is loaded.** With ``reward_model_type: lora``
   LLaMA-Factory loads the reward model as a second, frozen adapter (``load_adapter``) after creating the
   policy's trainable one. peft 0.18 applies the new adapter's inference mode to the *active* adapters too
   (huggingface/peft#3487), so the policy's LoRA weights silently stop requiring gradients: the optimizer,
   built right after, gets only the value head and PPO "trains" without changing the policy. The PPO workflow's
   ``create_reward_model`` is wrapped to give back ``requires_grad`` to exactly the parameters that had it
   before (the reward adapter's own stay frozen); with a peft that fixed this it changes nothing.

This module imports transformers and LLaMA-Factory; only the trainer process imports it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from finetune_operator.worker.ppo_runtime import TRL_ACCEPTED

#: LLaMA-Factory's workflows that cannot be imported next to the old trl, and the function each exports.
STAND_INS = {"llamafactory.train.dpo": "run_dpo", "llamafactory.train.kto": "run_kto"}


class PPORuntimeError(RuntimeError):
    """The trainer process was not started with a usable PPO trl."""


def _refuse(workflow: str) -> Any:
    def run(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise PPORuntimeError(f"{workflow} cannot run in a ppo stage's trainer process (it holds the PPO trl)")

    return run


def keep_trainable(create: Callable[..., Any]) -> Callable[..., Any]:
    """``create_reward_model`` that leaves every parameter that required gradients before still requiring them."""
    if getattr(create, "_keeps_trainable", False):
        return create

    def create_reward_model(model: Any, *args: Any, **kwargs: Any) -> Any:
        trainable = [p for p in model.parameters() if p.requires_grad]
        reward = create(model, *args, **kwargs)
        for p in trainable:
            p.requires_grad_(True)
        return reward

    create_reward_model._keeps_trainable = True  # type: ignore[attr-defined]
    return create_reward_model


def check_trl(runtime: str) -> str:
    """The imported trl's version, after checking that it is the one of the PPO folder and one LLaMA-Factory's PPO
    trainer accepts (a folder placed after another trl on ``sys.path`` would be silently ignored)."""
    import trl

    where = Path(trl.__file__).resolve()
    if not where.is_relative_to(Path(runtime).resolve()):
        raise PPORuntimeError(f"trl is imported from {where.parent}, not from the PPO folder {runtime}")
    version = tuple(int(p) for p in str(trl.__version__).split(".")[:3])
    low, high = TRL_ACCEPTED
    if not low <= version <= high:
        raise PPORuntimeError(f"trl {trl.__version__} in {runtime} is not one LLaMA-Factory's PPO trainer accepts")
    return str(trl.__version__)


def install(runtime: str) -> list[str]:
    """Apply the shims (see the module docstring) before LLaMA-Factory's ``run_exp`` is imported. Returns what it
    applied, for the log."""
    check_trl(runtime)
    applied: list[str] = []
    for name, function in STAND_INS.items():
        if name in sys.modules:
            continue
        module = types.ModuleType(name, f"Stand-in for {name} in a ppo stage (finetune_operator.worker.ppocompat).")
        setattr(module, function, _refuse(name))
        sys.modules[name] = module
        applied.append(f"{name} stand-in")

    from transformers import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "additional_special_tokens_ids"):
        alias = property(lambda self: self.extra_special_tokens_ids)
        setattr(PreTrainedTokenizerBase, "additional_special_tokens_ids", alias)  # noqa: B010 (typed class)
        applied.append("tokenizer additional_special_tokens_ids")

    from llamafactory.train.ppo.trainer import CustomPPOTrainer

    if not hasattr(CustomPPOTrainer, "processing_class"):
        setattr(CustomPPOTrainer, "processing_class", property(lambda self: self.tokenizer))  # noqa: B010
        applied.append("CustomPPOTrainer.processing_class")

    from llamafactory.train.ppo import workflow

    workflow.create_reward_model = keep_trainable(workflow.create_reward_model)
    applied.append("policy adapter kept trainable")
    return applied
