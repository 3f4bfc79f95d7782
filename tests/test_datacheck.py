"""The data check with real LLaMA-Factory (converters, template, processors) on the tiny model: rows read and
dropped with the reason and the first bad row's file and line, token lengths against cutoff_len, and agreement
with LLaMA-Factory's own dataset pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.constants import Reason
from finetune_operator.api.types import FineTuneJob
from finetune_operator.render import llamafactory as lf
from finetune_operator.render.plan import PathResolver
from finetune_operator.worker.preflight import check_data, outcome, run_preflight
from tests.test_local_run import shared_tiny_model

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


GOOD = {"messages": [msg("user", "What colour is the sky?"), msg("assistant", "The sky is blue.")]}
TAGS = {
    "roleTag": "role",
    "contentTag": "content",
    "userTag": "user",
    "assistantTag": "assistant",
    "systemTag": "system",
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_job(
    tmp_path: Path, tiny_model: Path, datasets: list[dict[str, Any]], stages: list[dict[str, Any]], **spec: Any
) -> tuple[FineTuneJob, PathResolver]:
    doc = {
        "metadata": {"name": "dc"},
        "spec": {
            "model": {"volume": {"claimName": "models"}, "template": "qwen"},
            "datasets": datasets,
            "output": {"volume": {"claimName": "out"}},
            "stages": stages,
            **spec,
        },
    }
    resolver = PathResolver(
        volume_root=str(tmp_path), config_dir=str(tmp_path / "cfg"), claims={"models": str(tiny_model)}
    )
    return FineTuneJob.model_validate(doc), resolver


def sharegpt(name: str, sub: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "volume": {"claimName": "data", "subPath": sub},
        "formatting": "sharegpt",
        "columns": {"messages": "messages", **extra.pop("columns", {})},
        "tags": TAGS,
        **extra,
    }


def test_broken_sharegpt_rows_are_counted_by_reason_with_the_first_line(tmp_path: Path, tiny_model: Path) -> None:
    rows = [
        json.dumps(GOOD),
        json.dumps(GOOD),
        "",  # blank lines are skipped, not rows
        '{"messages": [ this is not json',
        json.dumps({"conversation": GOOD["messages"]}),
        json.dumps({"messages": [msg("assistant", "hi"), msg("user", "hello")]}),
        json.dumps({"messages": [msg("user", "one"), msg("assistant", "two"), msg("user", "three")]}),
        json.dumps({"messages": [msg("user", " "), msg("assistant", "")]}),
        json.dumps(["not", "an", "object"]),
        json.dumps(GOOD),
    ]
    write_lines(tmp_path / "data" / "chat.jsonl", rows)
    job, res = make_job(
        tmp_path,
        tiny_model,
        [sharegpt("chat", "chat.jsonl")],
        [{"name": "sft", "type": "sft", "datasets": ["chat"], "args": {"cutoff_len": 64}}],
    )
    data = check_data(job, res, str(tiny_model))["sft"]
    ds = data.datasets[0]
    assert (ds.rows, ds.valid) == (9, 3)
    assert ds.dropped == {"malformed": 2, "missing_columns": 1, "wrong_roles": 1, "wrong_turns": 1, "empty": 1}
    assert ds.first_error is not None and ds.first_error.startswith(
        f"{tmp_path / 'data' / 'chat.jsonl'}:4: not valid JSON"
    )
    assert data.samples == 3
    # one row that is not JSON makes LLaMA-Factory's loader fail on the whole file: the data is unusable
    assert data.problems == [
        f"dataset chat: {tmp_path / 'data' / 'chat.jsonl'}:4 is not valid JSON (LLaMA-Factory's loader fails on "
        "the whole file)"
    ]


def test_alpaca_json_array_lines_and_missing_columns(tmp_path: Path, tiny_model: Path) -> None:
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Name a fruit.", "output": "Apple."},  # input is optional
        {"instruction": "Name a tree."},  # no output column
        {"instruction": "Count.", "input": "", "output": ["not", "text"]},  # LF drops non-text responses
    ]
    path = tmp_path / "data" / "alpaca.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    ds_spec = {"name": "inst", "volume": {"claimName": "data", "subPath": "alpaca.json"}}
    job, res = make_job(
        tmp_path,
        tiny_model,
        [ds_spec],
        [{"name": "sft", "type": "sft", "datasets": ["inst"], "args": {"cutoff_len": 64}}],
    )
    ds = check_data(job, res, str(tiny_model))["sft"].datasets[0]
    assert (ds.rows, ds.valid) == (4, 2)
    assert ds.dropped == {"missing_columns": 1, "invalid": 1}
    third = [i + 1 for i, t in enumerate(path.read_text().splitlines()) if t == "  {"][2]  # its opening line
    assert ds.first_error is not None and ds.first_error.startswith(f"{path}:{third}: missing column 'output'")


def test_preference_pairs_and_truncation(tmp_path: Path, tiny_model: Path) -> None:
    long_answer = " ".join(["blue"] * 200)
    rows = [
        json.dumps(
            {
                "messages": [msg("user", "Sky?")],
                "chosen": msg("assistant", "Blue."),
                "rejected": msg("assistant", "Green."),
            }
        ),
        json.dumps(
            {
                "messages": [msg("user", "Sky?")],
                "chosen": msg("assistant", long_answer),
                "rejected": msg("assistant", "Green."),
            }
        ),
        json.dumps(
            {
                "messages": [msg("user", "a"), msg("assistant", "b")],
                "chosen": msg("assistant", "c"),
                "rejected": msg("assistant", "d"),
            }
        ),  # a prompt must have an odd number of turns
        json.dumps(
            {"messages": [msg("user", "Sky?")], "chosen": msg("user", "Blue."), "rejected": msg("assistant", "Green.")}
        ),  # chosen must be an assistant turn
        json.dumps({"messages": [msg("user", "Sky?")], "chosen": msg("assistant", "Blue.")}),
    ]
    write_lines(tmp_path / "data" / "pairs.jsonl", rows)
    spec = sharegpt("prefs", "pairs.jsonl", ranking=True, columns={"chosen": "chosen", "rejected": "rejected"})
    job, res = make_job(
        tmp_path,
        tiny_model,
        [spec],
        [{"name": "dpo", "type": "dpo", "datasets": ["prefs"], "args": {"cutoff_len": 128}}],
    )
    data = check_data(job, res, str(tiny_model))["dpo"]
    ds = data.datasets[0]
    assert (ds.rows, ds.valid) == (5, 2)
    assert ds.dropped == {"wrong_turns": 1, "wrong_roles": 1, "missing_columns": 1}
    assert ds.truncated == 1 and ds.lengths[0] < 128 < ds.lengths[1]
    # pairs count both answers; the truncated pair contributes at most 2 x cutoff_len tokens
    assert ds.lengths[0] * 2 < ds.tokens <= ds.lengths[0] * 2 + 2 * 128


def test_max_samples_reads_only_what_llamafactory_uses(tmp_path: Path, tiny_model: Path) -> None:
    write_lines(tmp_path / "data" / "chat.jsonl", [json.dumps(GOOD)] * 5 + ["broken"])
    job, res = make_job(
        tmp_path,
        tiny_model,
        [sharegpt("chat", "chat.jsonl")],
        [{"name": "sft", "type": "sft", "datasets": ["chat"], "args": {"max_samples": 5}}],
    )
    ds = check_data(job, res, str(tiny_model))["sft"].datasets[0]
    assert (ds.rows, ds.valid, ds.dropped) == (5, 5, {})


def test_unusable_data_fails_preflight_with_invalid_data(tmp_path: Path, tiny_model: Path) -> None:
    write_lines(tmp_path / "data" / "chat.jsonl", [json.dumps({"messages": [msg("assistant", "no user")]})] * 3)
    job, res = make_job(
        tmp_path,
        tiny_model,
        [sharegpt("chat", "chat.jsonl"), sharegpt("gone", "missing.jsonl")],
        [{"name": "sft", "type": "sft", "datasets": ["chat"]}, {"name": "more", "type": "sft", "datasets": ["gone"]}],
    )
    result = run_preflight(job, res)
    reason, message = outcome(result)
    assert reason == Reason.INVALID_DATA
    assert message.startswith("stage sft: no valid samples (first problem: ") and "chat.jsonl:1:" in message
    assert result.plans[1].data is not None and "does not exist" in result.plans[1].data.problems[0]


def test_lengths_agree_with_llamafactorys_own_pipeline(tmp_path: Path, tiny_model: Path) -> None:
    """Same samples and the same token counts as LLaMA-Factory's get_dataset on the same config."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from finetune_operator.local.tinymodel import build_demo_data
    from finetune_operator.render.dump import to_json

    paths = build_demo_data(tmp_path / "data", rows=12)
    datasets = [
        sharegpt("chat", paths["sft_sharegpt"].name, columns={"system": "system"}),
        {
            "name": "describe",
            "volume": {"claimName": "data", "subPath": paths["sft_alpaca"].name},
            "columns": {"prompt": "question", "query": "context", "response": "answer"},
        },
    ]
    job, res = make_job(
        tmp_path,
        tiny_model,
        datasets,
        [{"name": "sft", "type": "sft", "datasets": ["chat", "describe"], "args": {"cutoff_len": 60}}],
    )
    ours = check_data(job, res, str(tiny_model))["sft"]
    cfg = lf.train_config(job, "sft", res)
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "dataset_info.json").write_text(to_json(lf.dataset_info(job, res)))
    cfg.update(
        dataset_dir=str(cfg_dir), output_dir=str(tmp_path / "o"), preprocessing_num_workers=None, overwrite_cache=True
    )
    model_args, data_args, training_args, _, _ = get_train_args(cfg)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, "sft", **tokenizer_module)
    theirs = sorted(len(ids) for ids in module["train_dataset"]["input_ids"])
    assert ours.samples == len(theirs) == 24
    mine = sorted(min(n, 60) for d in ours.datasets for n in d.lengths)
    assert mine == theirs
    assert ours.tokens == sum(theirs)
    assert ours.truncated == sum(1 for d in ours.datasets for n in d.lengths if n > 60) > 0


def test_enforce_refuses_and_warn_continues(tmp_path: Path, tiny_model: Path) -> None:
    from finetune_operator.errors import DataError, WillNotFitError
    from finetune_operator.worker.preflight import enforce

    write_lines(tmp_path / "data" / "chat.jsonl", [json.dumps(GOOD)] * 4)
    job, res = make_job(
        tmp_path,
        tiny_model,
        [sharegpt("chat", "chat.jsonl")],
        [{"name": "sft", "type": "sft", "datasets": ["chat"], "resources": {"gpuMemory": "256Mi"}}],
    )
    result = run_preflight(job, res)
    assert outcome(result)[0] == Reason.WILL_NOT_FIT
    with pytest.raises(WillNotFitError) as err:
        enforce(result, "Enforce")
    assert err.value.exit_code == 12 and str(err.value).startswith("WillNotFit: stage sft: estimated peak")
    warning = enforce(result, "Warn")
    assert warning is not None and warning.endswith("(spec.preflight.mode Warn: continuing)")
    write_lines(tmp_path / "data" / "chat.jsonl", ["{}"])
    with pytest.raises(DataError) as bad:
        enforce(run_preflight(job, res), "Enforce")
    assert bad.value.exit_code == 3 and "InvalidData: stage sft: no valid samples" in str(bad.value)
