"""``ftctl plan`` output: a readable report and the JSON document (``{"stages": [...]}``)."""

from __future__ import annotations

from typing import Any

from finetune_operator.estimate.memory import GIB
from finetune_operator.estimate.plan import UTILISATION, StagePlan, format_duration


def to_json(plans: list[StagePlan], *, model: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"stages": [p.to_json() for p in plans]}
    if model is not None:
        out["model"] = model
    return out


def _count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def _g(value: float) -> str:
    """GiB with two decimals; MiB for what would print as 0.00 (tiny models)."""
    if 0 < value < 0.005 * GIB:
        return f"{value / (1 << 20):.2f} MiB"
    return f"{value / GIB:.2f} GiB"


def stage_text(p: StagePlan) -> list[str]:
    s, b = p.settings, p.breakdown
    method = s.method + (f" r{s.lora_rank}" if s.method in ("lora", "qlora") else "")
    if s.gpus_per_node == 0:
        where = "CPU"
    else:
        where = f"{s.data_parallel} x {p.gpu.name}" if p.gpu else f"{s.data_parallel} x unknown GPU"
    zero = f", ZeRO-{s.zero_stage}{' offload' if s.offload else ''}" if s.zero_stage is not None else ""
    lines = [f"stage {p.name} ({s.stage_type}, {method}{zero}, {where})"]
    share = 100 * b.trainable_params / b.total_params if b.total_params else 0
    lines.append(
        f"  parameters  {_count(b.total_params)} total, {_count(b.trainable_params)} trainable ({share:.2f} %)"
    )
    cap = f" of {p.gpu.memory_gib:.1f} GiB" if p.gpu and s.gpus_per_node else ""
    unit = "GPU" if s.gpus_per_node else "process"
    lines.append(f"  memory      {_g(b.total)}{cap} per {unit}: {p.verdict} (peak at the {b.peak_at})")
    lines.append(
        f"    weights {_g(b.weights)} ({b.weights_dtype}), gradients {_g(b.gradients)}, optimizer {_g(b.optimizer)}, "
        f"activations {_g(b.activations)}, logits {_g(b.logits)}, reference model {_g(b.reference_model)}, "
        f"overhead {_g(b.overhead)}"
    )
    lines.append(
        f"    activations + logits at {b.sequences_per_step} x {b.sequence_length} tokens: "
        f"{_g(b.activations_with_checkpointing)} with gradient checkpointing, "
        f"{_g(b.activations_without_checkpointing)} without"
        f"{' (on)' if s.gradient_checkpointing else ' (off)'}"
    )
    if p.data is not None:
        d = p.data
        for ds in d.datasets:
            dropped = ", ".join(f"{n} {why}" for why, n in sorted(ds.dropped.items()))
            line = f"  data        {ds.name}: {ds.rows} rows, {ds.valid} valid"
            if ds.error:
                line += f" -- {ds.error}"
            elif dropped:
                line += f", dropped {dropped}"
            lines.append(line)
            if ds.first_error:
                lines.append(f"              first: {ds.first_error}")
            pc = ds.percentiles()
            if pc:
                lines.append(
                    f"              tokens p50 {pc['p50']} / p90 {pc['p90']} / p99 {pc['p99']} / max {pc['max']} "
                    f"vs cutoff_len {d.cutoff_len}: {ds.truncated} truncated"
                )
    if p.total_steps is not None:
        per = f"{p.steps_per_epoch} per epoch, " if p.steps_per_epoch is not None else ""
        tokens = f"; {_count(p.tokens)} tokens" if p.tokens else ""
        lines.append(f"  steps       {per}{p.total_steps} total{tokens}")
    if p.duration_seconds is not None and p.gpu is not None:
        lines.append(
            f"  duration    about {format_duration(p.duration_seconds)} "
            f"({int(UTILISATION * 100)} % of {p.gpu.tflops:.0f} TFLOP/s x {s.data_parallel} GPU)"
        )
    if p.suggestion:
        lines.append(f"  suggestion  {p.suggestion}")
    for note in p.notes:
        lines.append(f"  note        {note}")
    return lines


def to_text(plans: list[StagePlan], *, header: str | None = None) -> str:
    lines = [header] if header else []
    for p in plans:
        lines.extend(stage_text(p))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
