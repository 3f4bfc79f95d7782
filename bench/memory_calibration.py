"""Estimate vs measurement: the per-process peak memory of real LLaMA-Factory training steps on CPU.

    python bench/memory_calibration.py            # every case, a Markdown table on stdout
    python bench/memory_calibration.py --quick    # two cases

Each case loads a model with LLaMA-Factory's ``load_model`` (its fp32 upcast of trainable parameters, gradient
checkpointing, LoRA/freeze setup), trains two steps with torch AdamW (``foreach`` as on GPUs) and records the
second step's peak of live tensor bytes with PyTorch's MemTracker (``finetune_operator.local.memprobe``). The
estimate is :func:`finetune_operator.estimate.memory.estimate` with ``on_gpu=False`` and without the
fragmentation share: the same byte accounting (live tensors), since a CPU has no CUDA context or caching
allocator. Models: the tests' tiny Qwen2 (h=64, 2 layers, vocabulary 512) and a wider random-initialised
copy (h=256, 4 layers, MLP 688) sharing its tokenizer, each in fp32 and as a bf16 checkpoint trained with
bf16 autocast (the HF Trainer's mixed precision).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from finetune_operator.api.types import FineTuneJob
from finetune_operator.estimate.memory import estimate
from finetune_operator.estimate.settings import settings_for
from finetune_operator.estimate.shape import shape_from_config
from finetune_operator.local import demo
from finetune_operator.local.memprobe import Case, measure, model_variant

SMALL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

CASES: list[tuple[str, Case]] = [
    *[
        (m, c)
        for m in ("tiny", "small")
        for c in (
            Case(),
            Case(gradient_checkpointing=False),
            Case(method="full"),
            Case(method="freeze"),
            Case(method="full", gradient_checkpointing=False),
        )
    ],
    ("tiny-bf16", Case(precision="bf16")),
    ("tiny-bf16", Case(precision="bf16", method="full")),
    ("small-bf16", Case(precision="bf16")),
    ("small-bf16", Case(precision="bf16", gradient_checkpointing=False)),
]


def job_for(case: Case) -> FineTuneJob:
    stage: dict[str, Any] = {"name": "s", "type": "sft", "datasets": ["d"], "method": case.method, "args": case.args()}
    if case.method == "lora":
        stage["lora"] = {"rank": case.lora_rank}
    return FineTuneJob.model_validate(
        {
            "metadata": {"name": "calibration"},
            "spec": {
                "model": {"volume": {"claimName": "m"}, "template": "qwen"},
                "datasets": [{"name": "d", "volume": {"claimName": "d"}}],
                "output": {"volume": {"claimName": "o"}},
                "stages": [stage],
            },
        }
    )


def compare(model_dir: Path, case: Case) -> dict[str, Any]:
    measured = measure(model_dir, case)
    job = job_for(case)
    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    b = estimate(shape, settings_for(job, job.spec.stages[0]), on_gpu=False)
    est = b.total - b.overhead
    return {
        "case": case.label,
        "measured": measured.peak,
        "estimate": est,
        "error": (est - measured.peak) / measured.peak,
        "peak_at": b.peak_at,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", help="where the models are built (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        tiny = demo.ensure_tiny_model(root / "tiny")
        small = model_variant(tiny, root / "small", **SMALL)
        models = {
            "tiny": tiny,
            "small": small,
            "tiny-bf16": model_variant(tiny, root / "tiny-bf16", "bfloat16"),
            "small-bf16": model_variant(small, root / "small-bf16", "bfloat16"),
        }
        cases = CASES[:1] + CASES[7:8] if args.quick else CASES
        print("| model | case (method/precision/checkpointing/batch) | measured peak | estimate | error |")
        print("|---|---|---|---|---|")
        worst = 0.0
        for name, case in cases:
            row = compare(models[name], case)
            worst = max(worst, abs(row["error"]))
            print(
                f"| {name} | {row['case']} | {row['measured'] / 2**20:.2f} MiB | {row['estimate'] / 2**20:.2f} MiB "
                f"| {100 * row['error']:+.1f} % |",
                flush=True,
            )
        print(f"\nlargest error: {100 * worst:.1f} %", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
