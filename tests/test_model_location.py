"""A downloaded model gets a folder of its own: validation refuses a ``model.volume`` (with ``model.source``)
that is the claim root or contains a dataset or the output, since the download fills exactly that folder."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.validation import check


def job(model_volume: dict[str, Any], *, source: str | None = "Qwen/Qwen2-0.5B", **spec: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"volume": model_volume, "template": "qwen"}
    if source is not None:
        model["source"] = source
    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "loc", "namespace": "default"},
        "spec": {
            "model": model,
            "datasets": [{"name": "chat", "volume": {"claimName": "shared", "subPath": "team/data/chat.jsonl"}}],
            "output": {"volume": {"claimName": "outputs"}},
            "stages": [{"name": "sft", "type": "sft", "datasets": ["chat"], "method": "lora"}],
        },
    }
    doc["spec"].update(spec)
    return doc


def errors(doc: dict[str, Any]) -> list[str]:
    return [f"{e.path}: {e.message}" for e in check(doc)[1]]


@pytest.mark.parametrize(
    ("volume", "word"),
    [
        ({"claimName": "shared"}, "claim root"),
        ({"claimName": "shared", "subPath": "."}, "claim root"),
        ({"claimName": "shared", "subPath": "team"}, "spec.datasets[0]"),
        ({"claimName": "shared", "subPath": "team/data/"}, "spec.datasets[0]"),
        ({"claimName": "shared", "subPath": "./team//data"}, "spec.datasets[0]"),
        ({"claimName": "shared", "subPath": "team/data/chat.jsonl"}, "spec.datasets[0]"),
    ],
)
def test_download_target_that_would_hold_other_data_is_refused(volume: dict[str, Any], word: str) -> None:
    found = errors(job(volume))
    assert len(found) == 1 and found[0].startswith("spec.model.volume.subPath:"), found
    assert word in found[0] and "model.source" in found[0]


def test_download_target_containing_the_output_is_refused() -> None:
    doc = job(
        {"claimName": "outputs", "subPath": "runs"}, output={"volume": {"claimName": "outputs", "subPath": "runs/x"}}
    )
    (found,) = errors(doc)
    assert "spec.output" in found


@pytest.mark.parametrize(
    "doc",
    [
        job({"claimName": "shared", "subPath": "team/model"}),  # a sibling of the data: fine
        job({"claimName": "shared", "subPath": "teamx"}),  # a prefix of the name is not containment
        job({"claimName": "models", "subPath": "qwen"}),  # another claim
        job({"claimName": "shared"}, source=None),  # no download: nothing is replaced
    ],
)
def test_own_folder_is_accepted(doc: dict[str, Any]) -> None:
    assert [e for e in errors(doc) if "model.volume" in e] == []
