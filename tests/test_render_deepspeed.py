"""Every DeepSpeed config the renderer can produce is accepted by real DeepSpeed.

The renderer leaves batch sizes, clipping, precision and model-size-dependent buckets as ``"auto"``. This test
fills them with the HF Trainer's own code (``HfTrainerDeepSpeedConfig.trainer_config_process`` and
``trainer_config_finalize``, exactly what ``TrainingArguments``/``Trainer`` run at start-up) and then hands
the result to ``deepspeed.runtime.config.DeepSpeedConfig``, DeepSpeed's own validating config model.
"""

from __future__ import annotations

import itertools
import json
import types
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator.api.types import DeepSpeedSpec
from finetune_operator.errors import RenderError
from finetune_operator.render.deepspeed import deepspeed_config

pytestmark = pytest.mark.train

HIDDEN = 64
COMBINATIONS = list(itertools.product([0, 1, 2, 3], [False, True], ["bf16", "fp16", "fp32"]))


@pytest.fixture(scope="module")
def ds() -> Any:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


@pytest.fixture
def hf_config() -> Iterator[Any]:
    """HF's config class; its constructor registers a process-global weakref (is_deepspeed_zero3_enabled()
    reads it), which is removed after each test so that no other test sees a stale ZeRO-3 flag."""
    deepspeed_integration = pytest.importorskip("transformers.integrations.deepspeed")
    yield deepspeed_integration.HfTrainerDeepSpeedConfig
    deepspeed_integration.unset_hf_deepspeed_config()


def _trainer_args(precision: str) -> types.SimpleNamespace:
    """The TrainingArguments fields the HF DeepSpeed integration reads (world size 1: DeepSpeedConfig checks
    train_batch_size against the world size of an uninitialised process group, which is 1)."""
    return types.SimpleNamespace(
        world_size=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=1.0,
        learning_rate=1.0e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1.0e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=precision == "fp16",
        fp16_full_eval=False,
        bf16=precision == "bf16",
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0,
    )


def _has_auto(value: Any) -> bool:
    return "auto" in json.dumps(value)


@pytest.mark.parametrize(
    ("zero", "offload", "precision"), COMBINATIONS, ids=[f"z{z}-off{o:d}-{p}" for z, o, p in COMBINATIONS]
)
def test_deepspeed_accepts_generated_config(ds: Any, hf_config: Any, zero: int, offload: bool, precision: str) -> None:
    spec = DeepSpeedSpec(zero_stage=zero, offload=offload)
    if zero == 0 and offload:
        with pytest.raises(RenderError):
            deepspeed_config(spec)
        return
    raw = deepspeed_config(spec)
    assert _has_auto(raw)
    hf = hf_config(raw)
    args = _trainer_args(precision)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=HIDDEN)), 100)
    assert not _has_auto(hf.config), "the HF Trainer must be able to fill every 'auto'"
    cfg = ds(hf.config)
    assert cfg.zero_optimization_stage == zero
    assert cfg.train_batch_size == 8
    assert cfg.bfloat16_config.enabled is (precision == "bf16")
    assert cfg.float16_config.enabled is (precision == "fp16")
    assert (cfg.zero_config.offload_optimizer is not None) == offload
    assert (cfg.zero_config.offload_param is not None) == (offload and zero == 3)
    if zero == 3:
        assert cfg.zero_config.gather_16bit_weights_on_model_save is True


def test_deepspeed_rejects_a_misspelt_key(ds: Any, hf_config: Any) -> None:
    """The check is not vacuous: DeepSpeed's config model rejects an unknown ZeRO key."""
    raw = deepspeed_config(DeepSpeedSpec(zero_stage=2, offload=True))
    raw["zero_optimization"]["offload_optimiser"] = raw["zero_optimization"].pop("offload_optimizer")
    hf = hf_config(raw)
    args = _trainer_args("bf16")
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=HIDDEN)), 100)
    with pytest.raises(Exception, match="offload_optimiser"):
        ds(hf.config)
