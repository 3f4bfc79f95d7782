"""The estimate against peaks measured on CPU with real LLaMA-Factory model loading and training steps (the
same byte accounting: live tensors). The full table is ``bench/memory_calibration.py`` -> bench/README.md;
these two cases guard the two regimes: logits-dominated (the tiny model) and activation-dominated (wider)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.local.memprobe import Case, model_variant
from tests.test_local_run import shared_tiny_model

pytestmark = [pytest.mark.train, pytest.mark.slow]


def _compare(model: Path, case: Case) -> float:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "memory_calibration", Path(__file__).parents[1] / "bench" / "memory_calibration.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memory_calibration"] = mod
    spec.loader.exec_module(mod)
    return float(mod.compare(model, case)["error"])


def test_tiny_model_lora_with_checkpointing_within_ten_percent(tmp_path_factory: pytest.TempPathFactory) -> None:
    assert abs(_compare(shared_tiny_model(tmp_path_factory), Case())) < 0.10


def test_wider_model_without_checkpointing_within_ten_percent(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny = shared_tiny_model(tmp_path_factory)
    wide = model_variant(
        tiny,
        tmp_path_factory.getbasetemp() / "wide-model",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert abs(_compare(wide, Case(method="full", gradient_checkpointing=False))) < 0.10
    assert abs(_compare(wide, Case(gradient_checkpointing=False))) < 0.10
