"""A stage's plan: memory estimate, verdict with the cheapest change that fits, steps and duration.

Verdict: **fits** when the per-GPU peak is at most 90 % of the GPU's memory, **tight** up to 100 % (it may
run, but a longer batch than measured or a different kernel can tip it over), **does not fit** above. When it
does not fit (or is tight) the candidate changes of :data:`CHANGES` are tried in order -- cheapest first:
those that change neither the result nor the bill, then those that cost speed, then money, then quality --
and the first that brings the estimate to "fits" is suggested, with the field to set and the new peak.

Duration: FLOPs per token = 2 N (forward) + 4 N_trainable + 2 N_frozen (backward: weight and input
gradients for trained weights, input gradients only through frozen ones) + 2 N again with gradient
checkpointing (the recomputed forward) + 2 N for a reference model's forward; N counts the parameters a token
passes through (top-k experts for MoE). Time = tokens x FLOPs / (GPUs x peak x utilisation), with
:data:`UTILISATION` = 35 % of the dense BF16 peak -- a typical model-FLOPs utilisation of HF-Trainer fine-tuning
with fused attention; the real figure varies with sequence length, offload and interconnect.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.types import FineTuneJob, StageSpec
from finetune_operator.estimate.data import StageData
from finetune_operator.estimate.gpus import PRODUCT_LABEL, Gpu, lookup
from finetune_operator.estimate.memory import GIB, Breakdown, estimate
from finetune_operator.estimate.settings import TrainSettings, settings_for
from finetune_operator.estimate.shape import ModelShape

FITS, TIGHT, NO_FIT, NO_GPU, UNKNOWN = "fits", "tight", "does not fit", "no GPU (CPU stage)", "unknown GPU"
FIT_SHARE = 0.90
UTILISATION = 0.35


@dataclass(frozen=True)
class Change:
    """One candidate change: a description and a function giving the changed settings (None: not applicable)."""

    describe: Callable[[TrainSettings, TrainSettings, int], str]
    apply: Callable[[TrainSettings], list[TrainSettings]]


def _gc(s: TrainSettings) -> list[TrainSettings]:
    return [] if s.gradient_checkpointing else [s.with_(gradient_checkpointing=True)]


def _micro_batch(s: TrainSettings) -> list[TrainSettings]:
    out, mb = [], s.micro_batch
    while mb > 1:
        mb //= 2
        out.append(s.with_(micro_batch=mb, grad_accum=s.grad_accum * (s.micro_batch // mb)))
    return out


def _zero(s: TrainSettings) -> list[TrainSettings]:
    if s.data_parallel < 2:
        return []
    current = s.zero_stage or 0
    return [s.with_(zero_stage=z) for z in (1, 2, 3) if z > current]


def _offload(s: TrainSettings) -> list[TrainSettings]:
    if s.offload:
        return []
    return [s.with_(zero_stage=max(s.zero_stage or 0, z), offload=True) for z in (2, 3)]


def _method(s: TrainSettings) -> list[TrainSettings]:
    if s.method in ("full", "freeze"):
        lora = s.with_(method="lora", reference_model=False)
        return [lora, lora.with_(method="qlora", quant_bits=4)]
    if s.method == "lora":
        return [s.with_(method="qlora", quant_bits=4)]
    return []


def _more_gpus(s: TrainSettings) -> list[TrainSettings]:
    out = []
    for nodes, gpus in ((1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8)):
        if nodes * gpus > s.data_parallel:
            out.append(s.with_(nodes=nodes, gpus_per_node=gpus, zero_stage=3))
    return out


def _cutoff(s: TrainSettings) -> list[TrainSettings]:
    out, cutoff = [], s.cutoff_len
    while cutoff > 512:
        cutoff //= 2
        out.append(s.with_(cutoff_len=cutoff))
    return out


def _describe(before: TrainSettings, after: TrainSettings, stage: int) -> str:
    p = f"spec.stages[{stage}]"
    parts = []
    if after.gradient_checkpointing and not before.gradient_checkpointing:
        parts.append(f"remove {p}.args.disable_gradient_checkpointing")
    if after.micro_batch != before.micro_batch:
        parts.append(
            f"{p}.args.per_device_train_batch_size: {after.micro_batch} with gradient_accumulation_steps: "
            f"{after.grad_accum} (same global batch)"
        )
    if after.method != before.method:
        parts.append(f"{p}.method: {after.method}")
    if after.nodes != before.nodes or after.gpus_per_node != before.gpus_per_node:
        parts.append(f"{p}.resources: {{nodes: {after.nodes}, gpusPerNode: {after.gpus_per_node}}}")
    if after.zero_stage != before.zero_stage or after.offload != before.offload:
        parts.append(f"{p}.deepspeed: {{zeroStage: {after.zero_stage}, offload: {str(after.offload).lower()}}}")
    if after.cutoff_len != before.cutoff_len:
        parts.append(f"{p}.args.cutoff_len: {after.cutoff_len} (longer samples are truncated)")
    return "; ".join(parts)


#: Candidate changes, cheapest first (see the module docstring).
CHANGES: tuple[Change, ...] = tuple(
    Change(_describe, apply) for apply in (_gc, _micro_batch, _zero, _offload, _method, _more_gpus, _cutoff)
)


@dataclass
class StagePlan:
    """Everything ``ftctl plan`` and ``status.plan`` say about one training stage."""

    name: str
    index: int
    settings: TrainSettings
    breakdown: Breakdown
    gpu: Gpu | None
    verdict: str
    suggestion: str | None
    data: StageData | None
    steps_per_epoch: int | None
    total_steps: int | None
    tokens: int | None
    duration_seconds: float | None
    notes: list[str]

    @property
    def gpu_memory_gib(self) -> float:
        return round(self.breakdown.total / GIB, 2)

    @property
    def fits(self) -> bool | None:
        if self.verdict in (FITS, TIGHT, NO_GPU):
            return True
        if self.verdict == NO_FIT:
            return False
        return None

    def to_json(self) -> dict[str, Any]:
        b = self.breakdown
        s = self.settings
        out: dict[str, Any] = {
            "name": self.name,
            "gpuMemoryGiB": self.gpu_memory_gib,
            "fits": self.fits,
            "verdict": self.verdict,
            "breakdown": b.gib(),
            "suggestion": self.suggestion,
            "peakAt": b.peak_at,
            "parameters": {"total": b.total_params, "trainable": b.trainable_params},
            "method": s.method,
            "weightsDtype": b.weights_dtype,
            "sequenceLength": b.sequence_length,
            "sequencesPerStep": b.sequences_per_step,
            "activationsGiB": {
                "withGradientCheckpointing": round(b.activations_with_checkpointing / GIB, 2),
                "withoutGradientCheckpointing": round(b.activations_without_checkpointing / GIB, 2),
            },
            "gpu": {"name": self.gpu.name, "memoryGiB": self.gpu.memory_gib} if self.gpu else None,
            "gpus": s.data_parallel,
            "stepsPerEpoch": self.steps_per_epoch,
            "totalSteps": self.total_steps,
            "tokens": self.tokens,
            "estimatedSeconds": round(self.duration_seconds) if self.duration_seconds is not None else None,
            "notes": list(self.notes),
        }
        if self.data is not None:
            out["data"] = self.data.to_json()
        return out


def verdict_for(total: float, gpu: Gpu | None, s: TrainSettings) -> str:
    if s.gpus_per_node == 0:
        return NO_GPU
    if gpu is None:
        return UNKNOWN
    cap = gpu.memory_gib * GIB
    if total <= FIT_SHARE * cap:
        return FITS
    return TIGHT if total <= cap else NO_FIT


def suggest(shape: ModelShape, s: TrainSettings, gpu: Gpu, index: int, seq_len: int | None) -> str | None:
    """The first change of :data:`CHANGES` that makes the stage fit, as ``change (per-GPU peak X GiB)``."""
    for change in CHANGES:
        for candidate in change.apply(s):
            b = estimate(shape, candidate, seq_len=seq_len)
            if verdict_for(b.total, gpu, candidate) == FITS:
                return f"{change.describe(s, candidate, index)} (per-GPU peak {b.total / GIB:.1f} GiB)"
    return None


def flops_per_token(shape: ModelShape, b: Breakdown, s: TrainSettings) -> float:
    n = shape.active_params
    trainable = min(b.trainable_params, n)
    frozen = n - trainable
    flops = 2 * n + 4 * trainable + 2 * frozen
    if s.gradient_checkpointing:
        flops += 2 * n
    if s.reference_model:
        flops += 2 * n
    return float(flops)


def steps(s: TrainSettings, data: StageData | None) -> tuple[int | None, int | None]:
    """(steps per epoch, total optimizer steps) as the HF Trainer counts them."""
    per_epoch = None
    if data is not None:
        samples = data.samples
        if s.packing and data.tokens:
            samples = math.ceil(data.tokens / s.cutoff_len)
        per_rank = math.ceil(samples / s.data_parallel)
        batches = math.ceil(per_rank / s.micro_batch)
        per_epoch = max(1, math.ceil(batches / s.grad_accum)) if batches else 0
    if s.max_steps > 0:
        return per_epoch, s.max_steps
    if per_epoch is None:
        return None, None
    return per_epoch, math.ceil(s.epochs * per_epoch)


def gpu_for(job: FineTuneJob, stage: StageSpec, override: str | None) -> tuple[Gpu | None, list[str]]:
    """The stage's GPU: ``--gpu``, else ``resources.gpuMemory``, else the node selector's product label."""
    notes: list[str] = []
    if override:
        gpu = lookup(override)
        if gpu is None:
            notes.append(f"unknown GPU {override!r}")
        return gpu, notes
    memory = getattr(stage.resources, "gpu_memory", None) if stage.resources else None
    if memory:
        gib = parse_gib(str(memory))
        if gib is not None:
            return Gpu(f"{memory} GPU", gib, 0.0), notes
        notes.append(f"cannot read resources.gpuMemory {memory!r}")
    product = job.spec.scheduling.node_selector.get(PRODUCT_LABEL)
    if product:
        gpu = lookup(product)
        if gpu is None:
            notes.append(f"GPU {product!r} is not in the table: set resources.gpuMemory")
        return gpu, notes
    notes.append(f"no GPU model known: set the {PRODUCT_LABEL} node selector, resources.gpuMemory or --gpu")
    return None, notes


_UNITS = {"": 1 / GIB, "K": 1e3 / GIB, "M": 1e6 / GIB, "G": 1e9 / GIB, "T": 1e12 / GIB}
_BIN = {"Ki": 1 / (1 << 20), "Mi": 1 / 1024, "Gi": 1.0, "Ti": 1024.0}


def parse_gib(quantity: str) -> float | None:
    """A Kubernetes memory quantity (``80Gi``, ``80G``, ``81920Mi``) in GiB; None when unreadable."""
    q = quantity.strip()
    for suffix, factor in _BIN.items():
        if q.endswith(suffix):
            return _float(q[: -len(suffix)], factor)
    for suffix, factor in _UNITS.items():
        if suffix and q.endswith(suffix):
            return _float(q[:-1], factor)
    return _float(q, _UNITS[""])


def _float(text: str, factor: float) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value * factor if value > 0 else None


def plan_stage(
    job: FineTuneJob,
    index: int,
    shape: ModelShape,
    *,
    data: StageData | None = None,
    gpu_override: str | None = None,
) -> StagePlan:
    stage = job.spec.stages[index]
    s = settings_for(job, stage)
    gpu, notes = gpu_for(job, stage, gpu_override)
    if not shape.known_family:
        notes.append(f"model_type {shape.model_type!r} counted as a Llama-style decoder")
    if stage.type == "ppo":
        notes.append("ppo: the reward, reference and value-head models are not in the memory estimate")
    seq_len = None
    if data is not None and data.longest:
        seq_len = min(data.longest, s.cutoff_len)
    b = estimate(shape, s, seq_len=seq_len, on_gpu=s.gpus_per_node > 0)
    verdict = verdict_for(b.total, gpu, s)
    suggestion = None
    if gpu is not None and verdict in (TIGHT, NO_FIT):
        suggestion = suggest(shape, s, gpu, index, seq_len)
        if suggestion is None:
            suggestion = "no single change fits: combine ZeRO-3 offload, QLoRA and more GPUs"
    per_epoch, total_steps = steps(s, data)
    tokens: int | None = None
    if data is not None:
        epochs = s.max_steps / per_epoch if (s.max_steps > 0 and per_epoch) else s.epochs
        tokens = int(data.tokens * epochs)
    elif total_steps is not None:
        tokens = total_steps * s.global_batch * s.cutoff_len * (2 if s.paired else 1)
        notes.append("no data check: tokens assume every sample is cutoff_len long")
    duration = None
    if tokens is not None and gpu is not None and gpu.tflops > 0 and s.gpus_per_node > 0:
        duration = tokens * flops_per_token(shape, b, s) / (s.data_parallel * gpu.tflops * 1e12 * UTILISATION)
    return StagePlan(
        name=stage.name,
        index=index,
        settings=s,
        breakdown=b,
        gpu=gpu,
        verdict=verdict,
        suggestion=suggestion,
        data=data,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
        tokens=tokens,
        duration_seconds=duration,
        notes=notes,
    )


def plan_job(
    job: FineTuneJob,
    shape: ModelShape,
    *,
    data: Mapping[str, StageData] | None = None,
    gpu_override: str | None = None,
) -> list[StagePlan]:
    """A :class:`StagePlan` for every training stage (all stages train the base model's shape)."""
    data = data or {}
    return [
        plan_stage(job, i, shape, data=data.get(stage.name), gpu_override=gpu_override)
        for i, stage in enumerate(job.spec.stages)
    ]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = round(seconds / 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m" if minutes else f"{round(seconds)}s"
