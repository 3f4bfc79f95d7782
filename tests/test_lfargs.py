"""The generated LLaMA-Factory argument table: in sync with the installed llamafactory, and usable without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import lfargs
from finetune_operator.validation import check


def test_table_loads_and_has_the_arguments_we_rely_on() -> None:
    table = lfargs.load()
    args = table.arguments
    # One from each dataclass llamafactory-cli train parses.
    assert args["model_name_or_path"].group == "ModelArguments"
    assert args["cutoff_len"].group == "DataArguments"
    assert args["learning_rate"].group == "TrainingArguments"
    assert args["pref_beta"].group == "FinetuningArguments"
    assert args["max_new_tokens"].group == "GeneratingArguments"
    assert args["learning_rate"].types == ("float",)
    assert args["pref_loss"].choices is not None and "sigmoid" in args["pref_loss"].choices
    assert args["lr_scheduler_type"].choices is not None and "cosine" in args["lr_scheduler_type"].choices
    assert {"qwen", "llama3", "default"} <= table.templates


@pytest.mark.parametrize(
    ("types", "value", "ok"),
    [
        (("float",), 1, True),
        (("float",), 1.5, True),
        (("float",), True, False),
        (("float",), "1e-4", False),
        (("int",), 2, True),
        (("int",), 2.0, False),
        (("int",), False, False),
        (("bool",), True, True),
        (("bool",), 1, False),
        (("null", "str"), None, True),
        (("list", "str"), ["a"], True),
        (("dict",), {"a": 1}, True),
        (("any",), object(), True),
    ],
)
def test_accepts_type(types: tuple[str, ...], value: object, ok: bool) -> None:
    assert lfargs.ArgSpec("x", "G", types).accepts_type(value) is ok


def test_committed_json_is_deterministic() -> None:
    text = lfargs.TABLE_PATH.read_text(encoding="utf-8")
    assert lfargs.dumps(json.loads(text)) == text


@pytest.mark.train
def test_table_matches_installed_llamafactory() -> None:
    """Fails when LLaMA-Factory (or transformers) changes its arguments: regenerate with
    ``python -m finetune_operator.lfargs --write`` and review the diff."""
    fresh = lfargs.dumps(lfargs.generate())
    committed = lfargs.TABLE_PATH.read_text(encoding="utf-8")
    if fresh != committed:
        old, new = json.loads(committed), json.loads(fresh)
        added = sorted(set(new["arguments"]) - set(old["arguments"]))
        removed = sorted(set(old["arguments"]) - set(new["arguments"]))
        changed = sorted(
            k for k in set(old["arguments"]) & set(new["arguments"]) if old["arguments"][k] != new["arguments"][k]
        )
        pytest.fail(
            f"lf_arguments.json is stale: added {added}, removed {removed}, changed {changed}, "
            f"templates changed: {old['templates'] != new['templates']}, "
            f"versions {old['llamafactory_version']}->{new['llamafactory_version']}"
        )


# Rules of finetune_operator.validation that mirror LLaMA-Factory's own argument checks: each case must be
# rejected by our validation *and* by real LLaMA-Factory (get_train_args), so the rules are not invented.
# (stage index in tests.test_validation.base(): 0 = sft/lora, 1 = dpo/lora; method; args)
LF_MIRRORED: list[tuple[str, int, str, dict[str, object]]] = [
    ("unknown-key", 0, "lora", {"lerning_rate": 0.1}),
    ("bad-scheduler", 0, "lora", {"lr_scheduler_type": "cosin"}),
    ("label-smoothing-ipo", 1, "lora", {"pref_loss": "ipo", "dpo_label_smoothing": 0.1}),
    ("galore-lora", 0, "lora", {"use_galore": True}),
    ("mask-history-dpo", 1, "lora", {"mask_history": True}),
    ("eval-no-split", 0, "lora", {"do_eval": True}),
    ("infer-backend", 0, "lora", {"infer_backend": "vllm"}),
    ("dora-full", 0, "full", {"use_dora": True}),
    ("llama-pro-full", 0, "full", {"use_llama_pro": True}),
    ("streaming-no-max-steps", 0, "lora", {"streaming": True}),
    ("qlora-device-map", 0, "qlora", {"quantization_device_map": "auto"}),
]


@pytest.fixture(scope="module")
def get_train_args() -> object:
    import os

    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llamafactory.hparams import get_train_args as fn

    return fn


def _lf_config(tmp: str, stage_type: str, method: str, args: dict[str, object]) -> dict[str, object]:
    cfg: dict[str, object] = {
        "stage": stage_type,
        "do_train": True,
        "model_name_or_path": f"{tmp}/model",
        "dataset": "d",
        "dataset_dir": tmp,
        "template": "qwen",
        "finetuning_type": "lora" if method == "qlora" else method,
        "output_dir": f"{tmp}/out",
        "report_to": "none",
        "bf16": False,
        "fp16": False,
    }
    if method == "qlora":
        cfg["quantization_bit"] = 4
    return {**cfg, **args}


@pytest.mark.train
def test_lf_accepts_the_base_config(get_train_args: Any, tmp_path: Path) -> None:
    get_train_args(_lf_config(str(tmp_path), "sft", "lora", {"learning_rate": 1.0e-4, "cutoff_len": 128}))


@pytest.mark.train
@pytest.mark.parametrize(("index", "method", "args"), [pytest.param(i, m, a, id=n) for n, i, m, a in LF_MIRRORED])
def test_rule_mirrors_llamafactory(
    get_train_args: Any, tmp_path: Path, index: int, method: str, args: dict[str, object]
) -> None:
    from tests.test_validation import base

    obj = base()
    stage = obj["spec"]["stages"][index]
    stage["method"] = method
    if method not in ("lora", "qlora"):
        stage.pop("lora", None)
        del obj["spec"]["stages"][1 - index]
    stage["args"] = dict(args)
    _, errors = check(obj)
    assert any(e.path.startswith(f"spec.stages[{index}].args.") for e in errors), errors
    with pytest.raises((ValueError, SystemExit)):
        get_train_args(_lf_config(str(tmp_path), stage["type"], method, args))


@pytest.mark.train
def test_template_media_mirrors_llamafactorys_own_refusal() -> None:
    """Every template and media kind: the validation rule on media columns rejects exactly what LLaMA-Factory's
    multimodal plugin refuses when it tokenises a sample ("This model does not support image input")."""
    import os

    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    from llamafactory.data.template import TEMPLATES

    from tests.test_validation import base

    table = lfargs.load()
    kinds = ("images", "videos", "audios")
    for name, template in sorted(TEMPLATES.items()):
        for kind in kinds:
            media: dict[str, list[Any]] = {k: (["x"] if k == kind else []) for k in kinds}
            try:
                template.mm_plugin._validate_input(None, media["images"], media["videos"], media["audios"])
                refused = False
            except ValueError as exc:
                refused = "does not support" in str(exc)
            assert (kind not in table.template_media.get(name, frozenset())) is refused, (name, kind)
    # and through the validation rule, for one text and one vision template
    for name, refused in (("qwen", True), ("llava", False)):
        obj = base()
        obj["spec"]["model"]["template"] = name
        obj["spec"]["datasets"][0]["columns"]["images"] = "images"
        _, errors = check(obj)
        assert any(e.path == "spec.datasets[0].columns.images" for e in errors) is refused, errors
