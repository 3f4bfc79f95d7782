"""docs/api.md is generated from the API types; this fails when someone forgets to regenerate it."""

from __future__ import annotations

from pathlib import Path

from finetune_operator.api import reference, types

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_matches_the_types() -> None:
    committed = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert committed == reference.render_markdown(), (
        "docs/api.md is stale: run `python -m finetune_operator.api.reference`"
    )


def test_every_spec_field_is_documented() -> None:
    text = reference.render_markdown()
    for model in (types.FineTuneJobSpec, types.StageSpec, types.ServeSpec, types.ModelSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"`{field.alias or name}`" in text
