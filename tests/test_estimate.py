"""The pure estimator: parameter counts of real model families, memory by ZeRO stage and method, verdicts and
suggestions, steps and duration. Published numbers are the reference; see tests/fixtures/model-configs/README.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.types import FineTuneJob
from finetune_operator.estimate import gpus
from finetune_operator.estimate.data import DatasetStats, StageData, percentiles
from finetune_operator.estimate.memory import GIB, ZERO_BUCKET, estimate, trainable_params
from finetune_operator.estimate.plan import FITS, NO_FIT, TIGHT, parse_gib, plan_job, plan_stage, steps
from finetune_operator.estimate.settings import settings_for
from finetune_operator.estimate.shape import ShapeError, shape_from_config

CONFIGS = Path(__file__).parent / "fixtures" / "model-configs"
ROOT = Path(__file__).resolve().parents[1]


def shape(name: str) -> Any:
    return shape_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def job(stage: dict[str, Any], **spec: Any) -> FineTuneJob:
    doc = {
        "metadata": {"name": "j"},
        "spec": {
            "model": {"volume": {"claimName": "models"}, "template": "qwen"},
            "datasets": [{"name": "d", "volume": {"claimName": "data", "subPath": "d.jsonl"}}],
            "output": {"volume": {"claimName": "out"}},
            "stages": [{"name": "sft", "type": "sft", "datasets": ["d"], **stage}],
            **spec,
        },
    }
    return FineTuneJob.model_validate(doc)


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        ("qwen2-0.5b", 0.494e9, 0.494e9),
        ("qwen2-7b", 7.616e9, 7.616e9),
        ("llama3-8b", 8.030e9, 8.030e9),
        ("llama3-70b", 70.55e9, 70.55e9),
        ("mistral-7b-v0.3", 7.248e9, 7.248e9),
        ("mixtral-8x7b", 46.70e9, 12.88e9),
        ("qwen2-57b-a14b", 57.41e9, 14.25e9),
    ],
)
def test_parameter_counts_match_published_totals(name: str, total: float, active: float) -> None:
    s = shape(name)
    assert s.total_params == pytest.approx(total, rel=2e-3)
    assert s.active_params == pytest.approx(active, rel=5e-3)


def test_exact_counts_of_two_models() -> None:
    # The exact totals the Hugging Face model pages print (safetensors metadata).
    assert shape("llama3-8b").total_params == 8_030_261_248
    assert shape("qwen2-7b").total_params == 7_615_616_512


def test_lora_trainable_parameters_as_peft_counts_them() -> None:
    # peft's print_trainable_parameters for Llama 3 8B, r=8, all linear layers: 20,971,520.
    j = job({"method": "lora", "lora": {"rank": 8}})
    assert trainable_params(shape("llama3-8b"), settings_for(j, j.spec.stages[0])) == 20_971_520
    j = job({"method": "lora", "lora": {"rank": 16, "target": ["q_proj", "v_proj"]}})
    # q: 16 x (4096 + 4096), v: 16 x (4096 + 1024), 32 layers
    assert trainable_params(shape("llama3-8b"), settings_for(j, j.spec.stages[0])) == 32 * 16 * (8192 + 5120)


def test_freeze_trains_the_last_two_layers_by_default() -> None:
    j = job({"method": "freeze"})
    s = shape("qwen2-7b")
    assert trainable_params(s, settings_for(j, j.spec.stages[0])) == 2 * s.layer_params


def test_config_without_sizes_names_the_key() -> None:
    with pytest.raises(ShapeError, match="num_attention_heads"):
        shape_from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10})


def test_multimodal_wrapper_reads_text_config() -> None:
    inner = json.loads((CONFIGS / "qwen2-7b.json").read_text())
    assert shape_from_config({"model_type": "qwen2_vl_wrapper", "text_config": inner}).total_params == 7_615_616_512


@pytest.mark.parametrize(("zero", "expected_gb"), [(1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_model_states_reproduce_the_zero_paper(zero: int, expected_gb: float) -> None:
    """Rajbhandari et al. 2020, Figure 1: a 7.5 B model, Adam mixed precision (K = 12), 64 GPUs."""
    cfg = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
    }
    s = shape_from_config(cfg)
    psi = s.total_params
    assert psi == pytest.approx(7.5e9, rel=0.03)
    j = job(
        {
            "method": "full",
            "deepspeed": {"zeroStage": zero},
            "resources": {"nodes": 8, "gpusPerNode": 8},
            "args": {"bf16": True, "per_device_train_batch_size": 1, "cutoff_len": 16},
        }
    )
    b = estimate(s, settings_for(j, j.spec.stages[0]))
    states = b.gradients + b.optimizer + b.weights
    if b.peak_at == "optimizer step":
        states -= psi * 4 / 64  # AdamW's temporary at the step, not a model state
    if zero in (1, 2):
        states -= min(psi, ZERO_BUCKET) * 2 * (2 if zero == 2 else 1)  # DeepSpeed's buckets, not in the paper
    else:
        states -= 2 * s.layer_params * 2  # the two gathered layers
    scaled = states * 7.5e9 / psi / 1e9
    assert scaled == pytest.approx(expected_gb, abs=0.15 if zero < 3 else 0.1)


def test_zero_stages_and_offload_lower_the_per_gpu_peak() -> None:
    peaks = []
    for ds in (None, {"zeroStage": 1}, {"zeroStage": 2}, {"zeroStage": 3}, {"zeroStage": 3, "offload": True}):
        stage: dict[str, Any] = {
            "method": "full",
            "resources": {"gpusPerNode": 8},
            "args": {"bf16": True, "cutoff_len": 2048, "per_device_train_batch_size": 1},
        }
        if ds:
            stage["deepspeed"] = ds
        j = job(stage)
        peaks.append(estimate(shape("llama3-8b"), settings_for(j, j.spec.stages[0])).total)
    assert peaks == sorted(peaks, reverse=True)
    assert peaks[0] / GIB > 100 and peaks[-1] / GIB < 20


def test_gradient_checkpointing_and_cutoff_drive_activations() -> None:
    base = {"method": "lora", "args": {"bf16": True, "cutoff_len": 4096, "per_device_train_batch_size": 4}}
    j = job(base)
    on = estimate(shape("llama3-8b"), settings_for(j, j.spec.stages[0]))
    j = job({**base, "args": {**base["args"], "disable_gradient_checkpointing": True}})
    off = estimate(shape("llama3-8b"), settings_for(j, j.spec.stages[0]))
    assert off.activations > 5 * on.activations
    assert on.activations_without_checkpointing == off.activations_without_checkpointing
    # Llama 3's 128 k vocabulary: 4 x 4096 tokens of fp32 logits, log-softmax and gradient = 24 GiB
    assert on.logits / GIB == pytest.approx(4 * 4096 * 128256 * 12 / GIB, rel=1e-6)


def test_qlora_weights_are_a_quarter_of_lora() -> None:
    j = job({"method": "lora", "args": {"bf16": True}})
    lora = estimate(shape("qwen2-7b"), settings_for(j, j.spec.stages[0]))
    j = job({"method": "qlora", "args": {"bf16": True}})
    qlora = estimate(shape("qwen2-7b"), settings_for(j, j.spec.stages[0]))
    assert lora.weights / GIB == pytest.approx(14.3, abs=0.3)  # 7.6 B x 2 bytes + fp32 adapters
    # 6.5 B linear weights at 4.127 bits + 1.1 B embeddings/lm_head at 16 bits
    assert qlora.weights / GIB == pytest.approx(3.2 + 2.03, abs=0.3)


def test_dpo_full_keeps_a_reference_model_and_lora_does_not() -> None:
    j = job({"method": "full", "type": "dpo", "args": {"bf16": True}})
    full = estimate(shape("qwen2-7b"), settings_for(j, j.spec.stages[0]))
    assert full.reference_model / GIB == pytest.approx(7.6156e9 * 2 / GIB, rel=1e-3)
    assert full.sequences_per_step == 16  # chosen + rejected of 8 pairs
    j = job({"method": "lora", "type": "dpo"})
    assert estimate(shape("qwen2-7b"), settings_for(j, j.spec.stages[0])).reference_model == 0
    j = job({"method": "full", "type": "dpo", "args": {"pref_loss": "orpo"}})
    assert estimate(shape("qwen2-7b"), settings_for(j, j.spec.stages[0])).reference_model == 0


def test_moe_activations_use_the_routed_experts_only() -> None:
    j = job({"method": "lora", "args": {"bf16": True, "cutoff_len": 2048, "per_device_train_batch_size": 1}})
    s = settings_for(j, j.spec.stages[0])
    mixtral = estimate(shape("mixtral-8x7b"), s)
    assert mixtral.weights / GIB == pytest.approx(46.7e9 * 2 / GIB, rel=0.01)
    assert (
        mixtral.activations_without_checkpointing
        < 2 * estimate(shape("mistral-7b-v0.3"), s).activations_without_checkpointing
    )


def test_gpu_table_reads_node_labels_and_short_names() -> None:
    assert gpus.lookup("NVIDIA-A100-SXM4-80GB").memory_gib == 80.0
    assert gpus.lookup("NVIDIA-A100-SXM4-40GB").memory_gib == 40.0
    assert gpus.lookup("NVIDIA-H100-80GB-HBM3").name == "NVIDIA H100 SXM 80GB"
    assert gpus.lookup("NVIDIA-H100-PCIe").tflops == 756.0
    assert gpus.lookup("Tesla-T4").memory_gib == pytest.approx(14.6)
    assert gpus.lookup("NVIDIA-L4").name.startswith("NVIDIA L4 ")
    assert gpus.lookup("NVIDIA-L40S").name.startswith("NVIDIA L40S")
    assert gpus.lookup("h200").memory_gib > 139
    assert gpus.lookup("Radeon-9000") is None


def test_memory_quantities() -> None:
    assert parse_gib("80Gi") == 80.0
    assert parse_gib("81920Mi") == 80.0
    assert parse_gib("80G") == pytest.approx(74.5, abs=0.01)
    assert parse_gib("lots") is None


def test_verdict_and_cheapest_change_for_full_llama3_on_one_a100() -> None:
    j = job(
        {"method": "full", "args": {"bf16": True, "cutoff_len": 2048, "per_device_train_batch_size": 2}},
        scheduling={"nodeSelector": {gpus.PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"}},
    )
    p = plan_stage(j, 0, shape("llama3-8b"))
    assert p.verdict == NO_FIT and p.fits is False
    assert p.gpu_memory_gib > 130  # 16 bytes per parameter alone is 120 GiB
    # one GPU: no ZeRO to raise; offload of optimizer states is the cheapest change that fits
    assert p.suggestion is not None and "spec.stages[0].deepspeed" in p.suggestion and "offload: true" in p.suggestion
    j = job(
        {"method": "lora", "args": {"bf16": True, "cutoff_len": 2048, "per_device_train_batch_size": 2}},
        scheduling={"nodeSelector": {gpus.PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"}},
    )
    lora = plan_stage(j, 0, shape("llama3-8b"))
    assert lora.verdict == FITS and lora.suggestion is None


def test_eight_gpus_suggest_zero_before_offload() -> None:
    j = job(
        {
            "method": "full",
            "resources": {"gpusPerNode": 8},
            "args": {"bf16": True, "cutoff_len": 2048, "per_device_train_batch_size": 1},
        }
    )
    p = plan_stage(j, 0, shape("llama3-8b"), gpu_override="A100-80GB")
    assert p.verdict == NO_FIT
    assert p.suggestion is not None and "zeroStage: 1" in p.suggestion and "offload: false" in p.suggestion


def test_tight_is_between_ninety_and_hundred_percent() -> None:
    from finetune_operator.estimate.plan import verdict_for

    j = job({"method": "lora", "args": {"bf16": True, "cutoff_len": 1024, "per_device_train_batch_size": 1}})
    s = settings_for(j, j.spec.stages[0])
    total = estimate(shape("llama3-8b"), s).total
    assert verdict_for(total, gpus.Gpu("x", total / GIB / 0.95, 1.0), s) == TIGHT
    assert verdict_for(total, gpus.Gpu("x", total / GIB / 0.85, 1.0), s) == FITS
    assert verdict_for(total, gpus.Gpu("x", total / GIB / 1.05, 1.0), s) == NO_FIT


def test_every_example_gets_a_plan() -> None:
    from finetune_operator.validation import load_documents, validate

    for path in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        for doc in load_documents(str(path)):
            plans = plan_job(validate(doc), shape("qwen2-7b"), gpu_override="A100-80GB")
            assert plans and all(p.breakdown.total > 0 for p in plans), path.name
            for p in plans:
                json.dumps(p.to_json())


def test_example_three_full_mistral_zero3_on_sixteen_a100s_fits() -> None:
    from finetune_operator.validation import load_documents, validate

    j = validate(load_documents(str(ROOT / "manifests/examples/03-full-sft-zero3-two-nodes.yaml"))[0])
    p = plan_job(j, shape("mistral-7b-v0.3"))[0]
    assert p.gpu is not None and p.gpu.memory_gib == 80.0  # from the nvidia.com/gpu.product node selector
    assert p.verdict == FITS
    assert p.breakdown.weights / GIB < 2.5  # 14.5 GB of bf16 weights over 16 GPUs + two gathered layers


def test_steps_follow_the_hf_trainer() -> None:
    j = job(
        {
            "method": "lora",
            "resources": {"gpusPerNode": 2},
            "args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "num_train_epochs": 2.5},
        }
    )
    s = settings_for(j, j.spec.stages[0])
    data = StageData("sft", 2048, [DatasetStats("d", "d.jsonl", rows=1000, valid=990, tokens=99_000)])
    # 990 samples / 2 ranks = 495 -> 124 micro-batches -> ceil(124 / 3) = 42 steps per epoch; ceil(2.5 x 42) = 105
    assert steps(s, data) == (42, 105)
    j = job({"method": "lora", "args": {"max_steps": 7}})
    assert steps(settings_for(j, j.spec.stages[0]), data) == (124, 7)


def test_duration_from_tokens_and_flops() -> None:
    j = job(
        {
            "method": "full",
            "resources": {"gpusPerNode": 8},
            "deepspeed": {"zeroStage": 3},
            "args": {"bf16": True, "num_train_epochs": 1.0, "disable_gradient_checkpointing": True},
        }
    )
    data = StageData(
        "sft", 2048, [DatasetStats("d", "d.jsonl", rows=10, valid=10, lengths=[100] * 10, tokens=1_000_000_000)]
    )
    p = plan_stage(j, 0, shape("llama3-8b"), data=data, gpu_override="H100")
    # 6 N FLOPs per token, 1e9 tokens, 8 x 989 TFLOP/s at 35 %
    expected = 1e9 * 6 * 8.03e9 / (8 * 989e12 * 0.35)
    assert p.duration_seconds == pytest.approx(expected, rel=0.01)
    assert p.to_json()["estimatedSeconds"] == round(p.duration_seconds)


def test_percentiles_nearest_rank() -> None:
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([]) == {}


def test_json_shape_of_a_stage() -> None:
    j = job({"method": "lora"}, scheduling={"nodeSelector": {gpus.PRODUCT_LABEL: "NVIDIA-L4"}})
    out = plan_stage(j, 0, shape("qwen2-7b")).to_json()
    assert {"name", "gpuMemoryGiB", "fits", "breakdown", "suggestion"} <= set(out)
    assert set(out["breakdown"]) == {
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "referenceModel",
        "overhead",
    }
    assert out["gpuMemoryGiB"] == pytest.approx(sum(out["breakdown"].values()), abs=0.05)
