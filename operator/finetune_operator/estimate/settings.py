"""The training settings the memory and time estimates depend on, read from a stage of a FineTuneJob.

Everything comes from the spec and the stage's LLaMA-Factory ``args``, with LLaMA-Factory's and the HF
Trainer's defaults where an argument is absent (``cutoff_len`` 2048, micro-batch 8, gradient accumulation 1,
gradient checkpointing on, AdamW, three epochs). Values of the wrong type were already rejected by validation;
here they fall back to the default rather than crash the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from finetune_operator.api.types import FineTuneJob, StageSpec

#: LLaMA-Factory defaults (hparams/data_args.py, finetuning_args.py) and HF TrainingArguments defaults.
LF_DEFAULTS: dict[str, Any] = {
    "cutoff_len": 2048,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "optim": "adamw_torch",
    "freeze_trainable_layers": 2,
    "pref_loss": "sigmoid",
}

#: Bytes of optimizer state per trainable parameter, by HF ``optim`` name (AdamW: two fp32 moments).
OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "adamw_torch": 8.0,
    "adamw_torch_fused": 8.0,
    "adamw_hf": 8.0,
    "adamw_apex_fused": 8.0,
    "adamw_8bit": 2.0,
    "paged_adamw_8bit": 2.0,
    "paged_adamw_32bit": 8.0,
    "adamw_bnb_8bit": 2.0,
    "lion_8bit": 1.0,
    "lion_32bit": 4.0,
    "sgd": 0.0,
    "adagrad": 4.0,
    "adafactor": 0.0,
}


@dataclass(frozen=True)
class TrainSettings:
    """What one stage trains with, resolved to concrete values."""

    stage_type: str
    method: str
    lora_rank: int
    lora_target: tuple[str, ...]
    quant_bits: int | None
    zero_stage: int | None
    offload: bool
    nodes: int
    gpus_per_node: int
    micro_batch: int
    grad_accum: int
    cutoff_len: int
    gradient_checkpointing: bool
    precision: str
    """``bf16``, ``fp16``, ``pure_bf16`` or ``fp32``."""
    optim: str
    epochs: float
    max_steps: int
    max_samples: int | None
    freeze_layers: int
    reference_model: bool
    """A frozen copy of the model is kept for DPO/KTO (full/freeze methods; LoRA reuses the base)."""
    packing: bool

    @property
    def data_parallel(self) -> int:
        return max(1, self.nodes * max(1, self.gpus_per_node))

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel

    @property
    def paired(self) -> bool:
        """Preference stages run chosen and rejected answers in one batch (twice the sequences)."""
        return self.stage_type in ("dpo", "rm")

    def with_(self, **changes: Any) -> TrainSettings:
        return replace(self, **changes)


def _num(args: Mapping[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    value = args.get(key, LF_DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return kind(LF_DEFAULTS[key]) if key in LF_DEFAULTS else None
    return kind(value)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _precision(args: Mapping[str, Any], gpus: int) -> str:
    if _truthy(args.get("pure_bf16")):
        return "pure_bf16"
    if _truthy(args.get("bf16")):
        return "bf16"
    if _truthy(args.get("fp16")):
        return "fp16"
    return "fp32"


def settings_for(job: FineTuneJob, stage: StageSpec) -> TrainSettings:
    """Resolve ``stage`` (and its ``args``) to :class:`TrainSettings`."""
    args = stage.args
    res = stage.resources
    nodes = res.nodes if res else 1
    gpus = res.gpus_per_node if res else 1
    lora = stage.lora
    target = lora.target if lora else "all"
    targets = tuple(t.strip() for t in (target if isinstance(target, list) else str(target).split(",")) if t.strip())
    gc = not _truthy(args.get("disable_gradient_checkpointing", False))
    pref_loss = str(args.get("pref_loss", LF_DEFAULTS["pref_loss"]))
    full_copy = stage.method in ("full", "freeze")
    reference = full_copy and (stage.type == "kto" or (stage.type == "dpo" and pref_loss not in ("orpo", "simpo")))
    max_samples = args.get("max_samples")
    return TrainSettings(
        stage_type=stage.type,
        method=stage.method,
        lora_rank=lora.rank if lora else 8,
        lora_target=targets or ("all",),
        quant_bits=4 if stage.method == "qlora" else None,
        zero_stage=stage.deepspeed.zero_stage if stage.deepspeed else None,
        offload=bool(stage.deepspeed and stage.deepspeed.offload),
        nodes=nodes,
        gpus_per_node=gpus,
        micro_batch=max(1, _num(args, "per_device_train_batch_size", int)),
        grad_accum=max(1, _num(args, "gradient_accumulation_steps", int)),
        cutoff_len=max(1, _num(args, "cutoff_len", int)),
        gradient_checkpointing=gc,
        precision=_precision(args, gpus),
        optim=str(args.get("optim", LF_DEFAULTS["optim"])),
        epochs=_num(args, "num_train_epochs", float),
        max_steps=_num(args, "max_steps", int),
        max_samples=max_samples if isinstance(max_samples, int) and not isinstance(max_samples, bool) else None,
        freeze_layers=_num(args, "freeze_trainable_layers", int),
        reference_model=reference,
        packing=_truthy(args.get("packing", stage.type == "pt")),
    )
