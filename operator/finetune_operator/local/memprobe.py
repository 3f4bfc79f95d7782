"""Measure the memory of real training steps on CPU, in the estimator's byte accounting.

The model is loaded by LLaMA-Factory's own ``load_model`` (its fp32 upcast of trainable parameters, its
gradient checkpointing, its LoRA/freeze setup), then trained for two optimizer steps with the HF Trainer's
default optimizer (torch AdamW, ``foreach`` as on GPUs) on a batch of ``cutoff_len`` tokens. PyTorch's
``MemTracker`` (a dispatch-level tracker that attributes every live storage to parameters, gradients,
optimizer state, activations or temporaries) records the peak of the second step, when optimizer states
exist. This is the quantity the estimator predicts minus the GPU-only overhead (CUDA context, allocator
fragmentation): bytes of live tensors at the worst moment.

Used by ``bench/memory_calibration.py`` (the table in ``bench/README.md``) and the calibration test.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    method: str = "lora"
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (bf16: the compute dtype LLaMA-Factory would pick with ``bf16: true``, and
    autocast like the HF Trainer's mixed precision)."""
    gradient_checkpointing: bool = True
    micro_batch: int = 2
    seq_len: int = 128
    lora_rank: int = 8

    @property
    def label(self) -> str:
        gc = "gc" if self.gradient_checkpointing else "no-gc"
        return f"{self.method}/{self.precision}/{gc}/b{self.micro_batch}xs{self.seq_len}"

    def args(self) -> dict[str, Any]:
        """The stage ``args`` that describe this case (for the estimator)."""
        out: dict[str, Any] = {
            "cutoff_len": self.seq_len,
            "per_device_train_batch_size": self.micro_batch,
            "disable_gradient_checkpointing": not self.gradient_checkpointing,
        }
        if self.precision == "bf16":
            out["bf16"] = True
        return out


@dataclass(frozen=True)
class Measurement:
    case: Case
    peak: int
    by_kind: dict[str, int]


def measure(model_dir: str | os.PathLike[str], case: Case) -> Measurement:
    """Load ``model_dir`` the way LLaMA-Factory does for ``case``, train two steps, return the second step's peak."""
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    import torch
    from llamafactory.hparams import FinetuningArguments, ModelArguments
    from llamafactory.model import load_model, load_tokenizer
    from transformers import HfArgumentParser

    args: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "finetuning_type": "lora" if case.method == "lora" else case.method,
        "stage": "sft",
        "disable_gradient_checkpointing": not case.gradient_checkpointing,
    }
    if case.method == "lora":
        args.update({"lora_rank": case.lora_rank, "lora_target": "all"})
    parser = HfArgumentParser((ModelArguments, FinetuningArguments))
    model_args, finetuning_args = parser.parse_dict(args, allow_extra_keys=True)
    compute = torch.bfloat16 if case.precision == "bf16" else torch.float32
    model_args.compute_dtype = compute
    model_args.model_max_length = case.seq_len
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = load_tokenizer(model_args)["tokenizer"]
        model = load_model(tokenizer, model_args, finetuning_args, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (case.micro_batch, case.seq_len), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if case.precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer states
    tracker = _tracker_class()()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    cpu = next(iter(snapshot.values()))
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in cpu.items()}
    return Measurement(case=case, peak=by_kind.pop("Total"), by_kind=by_kind)


def _tracker_class() -> Any:
    """PyTorch's MemTracker hooks every parameter's gradient, which fails on frozen ones (LoRA, freeze): a
    subclass that tracks frozen parameters as parameters and hooks only trainable ones."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareMemTracker(MemTracker):  # type: ignore[no-untyped-call]
        def _track_module_params_and_buffers(self, module: Any, install_grad_hooks: bool = True) -> tuple[int, int]:
            def on_grad(grad: Any) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                infos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(info.mem_consumed for info in infos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if param.requires_grad and install_grad_hooks and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(on_grad),
                        param.register_post_accumulate_grad_hook(lambda p: on_grad(p.grad)),
                    )
            buffer_memory = 0
            for buf in module.buffers():
                infos = self._update_and_maybe_create_winfos(buf, _MemRefType.BUFFER)
                buffer_memory += sum(info.mem_consumed for info in infos)
            return param_memory, buffer_memory

    return FrozenAwareMemTracker


def model_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    import json

    return dict(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))


def model_variant(
    tiny_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str = "float32", **sizes: int
) -> Path:
    """A randomly initialised copy of the tiny model with other sizes and/or another checkpoint dtype, sharing
    its tokenizer (real models ship bf16 checkpoints, which LLaMA-Factory loads as they are)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(str(tiny_dir))
    for key, value in sizes.items():
        setattr(config, key, value)
    if "num_hidden_layers" in sizes and getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * sizes["num_hidden_layers"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(  # type: ignore[no-untyped-call]
        getattr(torch, dtype)
    )
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(tiny_dir) / name).is_file():
            shutil.copy2(Path(tiny_dir) / name, out / name)
    return out
