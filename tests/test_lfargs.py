"""The generated LLaMA-Factory argument table: in sync with the installed llamafactory, and usable without it."""

from __future__ import annotations

import json

import pytest

from finetune_operator import lfargs


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


@pytest.mark.parametrize(("types", "value", "ok"), [
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
])
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
        changed = sorted(k for k in set(old["arguments"]) & set(new["arguments"])
                         if old["arguments"][k] != new["arguments"][k])
        pytest.fail(f"lf_arguments.json is stale: added {added}, removed {removed}, changed {changed}, "
                    f"templates changed: {old['templates'] != new['templates']}, "
                    f"versions {old['llamafactory_version']}->{new['llamafactory_version']}")
