"""LLaMA-Factory arguments (``spec.stages[].args``): names, types, choices and cross-argument rules.

Checked against the generated table in :mod:`finetune_operator.lfargs` (names, types, choices, templates) --
no torch and no llamafactory import at runtime. The cross-argument rules (:data:`ARGS_RULES`) mirror checks of
LLaMA-Factory's hparams parser, so a spec fails here instead of at pod start.

Decisions:

- Arguments the operator owns (:data:`RESERVED_ARGS`, :data:`RESERVED_PREFIXES`) are refused with the field
  to use instead; credentials (:data:`SECRET_ARGS`) are refused because args are stored in a ConfigMap.
- ``lora_rank``/``lora_alpha``/``lora_dropout``/``lora_target`` are always the operator's for lora/qlora
  stages (from ``lora``, or its defaults): set them in the ``lora`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.types import ADAPTER_METHODS, StageSpec
from finetune_operator.errors import FieldError
from finetune_operator.render import chain as walker
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.words import hint, join, kind

#: Arguments the operator sets itself, with where the user says what they want instead.
RESERVED_ARGS: Mapping[str, str] = {
    "model_name_or_path": "spec.model",
    "adapter_name_or_path": "the stage order (earlier LoRA stages are stacked automatically)",
    "create_new_adapter": "the stage order (set automatically when adapters stack)",
    "output_dir": "spec.output (stages write to <output>/<job>/<stage>/)",
    "overwrite_output_dir": "nothing: the operator resumes from the last checkpoint on retry",
    "resume_from_checkpoint": "nothing: the operator resumes from the last checkpoint on retry",
    "dataset": "spec.stages[].datasets",
    "eval_dataset": "spec.stages[].datasets and args.val_size",
    "dataset_dir": "spec.datasets",
    "deepspeed": "spec.stages[].deepspeed",
    "template": "spec.model.template",
    "stage": "spec.stages[].type",
    "finetuning_type": "spec.stages[].method",
    "quantization_bit": "method: qlora (4-bit)",
    "do_train": "nothing: training stages always train",
    "export_dir": "spec.merge",
    "export_size": "spec.merge.exportSize",
    "export_device": "spec.merge.exportDevice",
    "export_legacy_format": "spec.merge",
    "export_hub_model_id": "spec.merge",
    "cache_dir": "nothing: caches live in the pod",
    "model_revision": "spec.model.revision",
}

#: Families of arguments that belong to other steps than training (LLaMA-Factory ignores them in ``train``).
RESERVED_PREFIXES: Mapping[str, str] = {
    "export_": "spec.merge (the merge step runs the export)",
    "vllm_": "spec.serve (vLLM runs in the serve step)",
    "sglang_": "spec.serve (the serve step uses vLLM)",
    "infer_": "spec.serve (inference runs in the serve step)",
}

#: LoRA arguments the renderer sets for lora/qlora stages from the ``lora`` block (or its defaults).
LORA_BLOCK_ARGS: Mapping[str, str] = {
    "lora_rank": "spec.stages[].lora.rank",
    "lora_alpha": "spec.stages[].lora.alpha",
    "lora_dropout": "spec.stages[].lora.dropout",
    "lora_target": "spec.stages[].lora.target",
}

#: Credentials: args end up in a ConfigMap, and secrets must only travel as secretKeyRef.
SECRET_ARGS = frozenset(
    {
        "hf_hub_token",
        "ms_hub_token",
        "om_hub_token",
        "hub_token",
        "swanlab_api_key",
        "swanlab_lark_secret",
        "swanlab_lark_webhook_url",
    }
)

#: Arguments that only mean something for LoRA training (LLaMA-Factory ignores or rejects them otherwise).
LORA_ONLY_ARGS = frozenset(
    {
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "use_rslora",
        "use_dora",
        "pissa_init",
        "pissa_iter",
        "pissa_convert",
    }
)
FREEZE_ONLY_ARGS = frozenset({"freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"})
#: SFT-only arguments (LLaMA-Factory: "cannot be set as True except SFT").
SFT_ONLY_ARGS = frozenset({"predict_with_generate", "neat_packing", "train_on_prompt", "mask_history"})


@rule
def args_keys_allowed(ctx: Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        method = stage.method
        for key in stage.args:
            path = join(f"spec.stages[{i}].args", key)
            if key in SECRET_ARGS:
                yield FieldError(
                    path,
                    "credentials must not be in args (they would be stored in a ConfigMap): "
                    "use spec.model.tokenSecretRef",
                )
            elif key in RESERVED_ARGS:
                yield FieldError(path, f"{key} is set by the operator: use {RESERVED_ARGS[key]}")
            elif key.startswith(tuple(RESERVED_PREFIXES)):
                use = next(v for p, v in RESERVED_PREFIXES.items() if key.startswith(p))
                yield FieldError(path, f"{key} does not apply to a training stage: use {use}")
            elif key in LORA_BLOCK_ARGS and method in ADAPTER_METHODS:
                yield FieldError(
                    path, f"{key} is set by the operator from the stage's lora settings: use {LORA_BLOCK_ARGS[key]}"
                )
            elif key in LORA_ONLY_ARGS and method not in ADAPTER_METHODS:
                yield FieldError(path, f"{key} applies to methods lora and qlora only, not {method!r}")
            elif key in FREEZE_ONLY_ARGS and method != "freeze":
                yield FieldError(path, f"{key} applies to method freeze only, not {method!r}")
            elif key not in ctx.lf.arguments:
                yield FieldError(path, f"unknown LLaMA-Factory argument {key!r}{hint(key, ctx.lf.arguments)}")


@rule
def args_values_typed(ctx: Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        for key, value in stage.args.items():
            spec = ctx.lf.arguments.get(key)
            if spec is None or key in RESERVED_ARGS or key in SECRET_ARGS:
                continue
            path = join(f"spec.stages[{i}].args", key)
            if not spec.accepts_type(value):
                expected = " or ".join(_TYPE_WORDS.get(t, t) for t in spec.types)
                got = kind(value) if value is None else f"{kind(value)} {value!r}"
                yield FieldError(path, f"wrong type: expected {expected}, got {got}{_number_hint(value, spec.types)}")
            elif spec.choices is not None and value is not None and value not in spec.choices:
                choices = ", ".join(repr(c) for c in spec.choices)
                suggestion = hint(value, [str(c) for c in spec.choices]) if isinstance(value, str) else ""
                yield FieldError(path, f"invalid choice {value!r}: expected one of {choices}{suggestion}")


@dataclass(frozen=True)
class Bound:
    """A numeric range an argument must lie in, and whose check it mirrors."""

    low: float | None
    low_open: bool
    high: float | None
    source: str
    whole_above_one: bool = False
    """Values above 1 must be whole numbers (transformers reads values in (0, 1) as a ratio of the steps)."""

    def violated(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return True
        if self.high is not None and value > self.high:
            return True
        return self.whole_above_one and value > 1 and value != int(value)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {_num(self.low)} and {_num(self.high)}"
        if self.low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {_num(self.low)}"
        return f"at most {_num(self.high or 0)}"


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


_STEPS = "transformers.TrainingArguments (a 'steps' strategy needs a non-zero interval)"
_SEED = "numpy.random.seed and torch.manual_seed accept 0 .. 2**32-1 (transformers.set_seed calls both)"

#: Ranges of numeric arguments, each from the check of LLaMA-Factory, transformers or torch that fails (or
#: makes the run meaningless) at pod start. Integers and floats alike; booleans are not numbers here.
ARG_BOUNDS: Mapping[str, Bound] = {
    "logging_steps": Bound(0, True, None, _STEPS, whole_above_one=True),
    "save_steps": Bound(0, True, None, _STEPS, whole_above_one=True),
    "eval_steps": Bound(0, True, None, _STEPS, whole_above_one=True),
    "seed": Bound(0, False, 2**32 - 1, _SEED),
    "data_seed": Bound(0, False, 2**32 - 1, _SEED),
    "per_device_train_batch_size": Bound(1, False, None, "a batch needs at least one sample"),
    "per_device_eval_batch_size": Bound(1, False, None, "a batch needs at least one sample"),
    "gradient_accumulation_steps": Bound(1, False, None, "transformers divides the steps by it"),
    "learning_rate": Bound(0, False, None, "torch.optim refuses a negative learning rate"),
    "warmup_ratio": Bound(0, False, 1, "transformers.TrainingArguments: warmup_ratio must lie in [0, 1]"),
    "warmup_steps": Bound(0, False, None, "transformers.TrainingArguments: warmup_steps must not be negative"),
    "weight_decay": Bound(0, False, None, "torch.optim refuses a negative weight decay"),
    "adam_beta1": Bound(0, False, 0.999999, "torch.optim: betas must lie in [0, 1)"),
    "adam_beta2": Bound(0, False, 0.999999, "torch.optim: betas must lie in [0, 1)"),
    "adam_epsilon": Bound(0, False, None, "torch.optim refuses a negative epsilon"),
    "max_grad_norm": Bound(0, False, None, "torch's clip_grad_norm_ would flip the gradients' sign"),
    "num_train_epochs": Bound(0, True, None, "training for zero epochs trains nothing"),
    "dataloader_num_workers": Bound(0, False, None, "torch.utils.data.DataLoader refuses negative workers"),
    "save_total_limit": Bound(1, False, None, "keeping no checkpoint would leave nothing to resume from"),
    "cutoff_len": Bound(1, False, None, "LLaMA-Factory would cut every sample to nothing"),
    "val_size": Bound(0, False, None, "LLaMA-Factory: a fraction in [0, 1) or a number of samples"),
    "max_samples": Bound(1, False, None, "LLaMA-Factory would keep no sample"),
    "preprocessing_num_workers": Bound(1, False, None, "datasets.map needs at least one process"),
}


@rule
def args_within_bounds(ctx: Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        for key, value in stage.args.items():
            bound = ARG_BOUNDS.get(key)
            if bound is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value != value or bound.violated(value):  # NaN compares false: never in range
                extra = ", and a whole number above 1" if bound.whole_above_one else ""
                yield FieldError(
                    join(f"spec.stages[{i}].args", key),
                    f"{value!r} is out of range: must be {bound.describe()}{extra} ({bound.source})",
                )


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "null": "null",
}


def _number_hint(value: Any, types: tuple[str, ...]) -> str:
    if isinstance(value, str) and ("float" in types or "int" in types):
        try:
            float(value)
        except ValueError:
            return ""
        return " (write the number without quotes)"
    return ""


def _truthy(args: Mapping[str, Any], key: str) -> bool:
    return args.get(key) is True


@dataclass(frozen=True)
class _ArgsRule:
    """A cross-argument rule of LLaMA-Factory's parser, checked before a pod starts."""

    key: str
    applies: Callable[[StageSpec, Mapping[str, Any]], bool]
    message: str


#: (argument to blame, condition on (stage, args), reason). Mirrors checks in LLaMA-Factory's hparams parser.
ARGS_RULES: tuple[_ArgsRule, ...] = (
    _ArgsRule(
        "fp16",
        lambda s, a: _truthy(a, "bf16") and _truthy(a, "fp16"),
        "bf16 and fp16 cannot both be true: choose one mixed-precision type",
    ),
    _ArgsRule(
        "pure_bf16",
        lambda s, a: _truthy(a, "pure_bf16") and walker.zero_stage(s) == 3,
        "pure_bf16 is incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "predict_with_generate",
        lambda s, a: _truthy(a, "predict_with_generate") and walker.zero_stage(s) == 3,
        "predict_with_generate is incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "pissa_init",
        lambda s, a: _truthy(a, "pissa_init") and (walker.zero_stage(s) == 3 or s.method == "qlora"),
        "pissa_init cannot initialize adapters under DeepSpeed ZeRO-3 or on a quantized (qlora) model",
    ),
    _ArgsRule(
        "use_unsloth",
        lambda s, a: _truthy(a, "use_unsloth") and walker.zero_stage(s) == 3,
        "use_unsloth is incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "fp8",
        lambda s, a: _truthy(a, "fp8") and s.method == "qlora",
        "fp8 training is incompatible with quantization (method qlora)",
    ),
    _ArgsRule(
        "use_galore",
        lambda s, a: _truthy(a, "use_galore") and s.deepspeed is not None,
        "GaLore is incompatible with DeepSpeed: remove spec.stages[].deepspeed",
    ),
    _ArgsRule(
        "use_apollo",
        lambda s, a: _truthy(a, "use_apollo") and s.deepspeed is not None,
        "APOLLO is incompatible with DeepSpeed: remove spec.stages[].deepspeed",
    ),
    *(
        _ArgsRule(
            k,
            (lambda key: lambda s, a: _truthy(a, key) and s.method in ADAPTER_METHODS)(k),
            f"{k} cannot be combined with LoRA: use method full or freeze",
        )
        for k in ("use_galore", "use_apollo", "use_badam")
    ),
    *(
        _ArgsRule(
            k,
            (lambda key: lambda s, a: _truthy(a, key) and s.type != "sft")(k),
            f"{k} is only valid for sft stages",
        )
        for k in sorted(SFT_ONLY_ARGS)
    ),
    _ArgsRule(
        "load_best_model_at_end",
        lambda s, a: _truthy(a, "load_best_model_at_end") and s.type == "rm",
        "rm stages do not support load_best_model_at_end",
    ),
    _ArgsRule(
        "do_eval",
        lambda s, a: (
            (_truthy(a, "do_eval") or _truthy(a, "do_predict"))
            and not (isinstance(a.get("val_size"), int | float) and a["val_size"] > 0)
        ),
        "evaluation needs a validation split: set args.val_size (e.g. 0.1)",
    ),
    _ArgsRule(
        "streaming",
        lambda s, a: _truthy(a, "streaming") and not isinstance(a.get("max_steps"), int),
        "streaming needs args.max_steps (the dataset length is unknown)",
    ),
    _ArgsRule(
        "push_to_hub",
        lambda s, a: _truthy(a, "push_to_hub"),
        "training pods get no hub credentials (the token reaches only the download pod): keep results on "
        "spec.output and publish the merged model from there",
    ),
    _ArgsRule(
        "use_llama_pro",
        lambda s, a: _truthy(a, "use_llama_pro") and s.method == "full",
        "use_llama_pro is only valid for freeze or LoRA training",
    ),
    _ArgsRule(
        "quantization_device_map",
        lambda s, a: a.get("quantization_device_map") is not None,
        "a device map cannot be used for quantized models in training",
    ),
    _ArgsRule(
        "quantization_method",
        lambda s, a: a.get("quantization_method") in ("hqq", "eetq") and walker.zero_stage(s) == 3,
        "HQQ and EETQ quantization are incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "dpo_label_smoothing",
        lambda s, a: (
            s.type == "dpo"
            and a.get("pref_loss", "sigmoid") != "sigmoid"
            and isinstance(a.get("dpo_label_smoothing"), int | float)
            and a["dpo_label_smoothing"] > 1e-6
        ),
        "dpo_label_smoothing is only valid with pref_loss sigmoid",
    ),
)


@rule
def args_combinations(ctx: Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        args = stage.args
        if not args:
            continue
        for check in ARGS_RULES:
            try:
                hit = check.applies(stage, args)
            except TypeError:  # a mistyped value; args_values_typed reports it
                hit = False
            if hit:
                yield FieldError(f"spec.stages[{i}].args.{check.key}", check.message)
