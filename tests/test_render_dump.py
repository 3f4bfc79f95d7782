"""The renderer dumps YAML with libyaml's emitter: the same bytes as the pure-Python emitter for every
example (golden files, GitOps diffs and the operator's ConfigMaps stay as they were), and for awkward values
text that reads back to the same value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.render import dump, render_yaml
from finetune_operator.validation import validate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "manifests/examples").glob("*.yaml"))


class PurePythonDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


PurePythonDumper.add_representer(str, dump._str_representer)

AWKWARD: list[Any] = [
    {"s": "a\nb\n---\nkind: Secret\n", "t": "trailing spaces  \n  x", "u": "ünïcödé ✓ 日本語", "e": ""},
    {"quoted": ["yes", "no", "on", "off", "null", "~", "1e3", "0x10", "012", "1_000", "2026-11-29", ":", "- a"]},
    {"floats": [1e-05, 0.1, 1.0, float("inf"), 3e20], "ints": [0, -1, 2**63], "b": [True, False, None]},
    {"long": "x " * 3000, "tab": "a\tb", "cr": "a\rb", "nul": "a\x00b", "bom": "\ufeffx", "emoji": "🙂"},
    {"nested": {"z": {"y": [{"x": [[], {}, [1, [2, [3]]]]}]}}, "": "empty key", "k:v": "colon key"},
]


def with_pure_python(value: Any) -> str:
    return yaml.dump(
        dict(value), Dumper=PurePythonDumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=4096
    )


def test_the_fast_emitter_is_in_use() -> None:
    assert issubclass(dump._Dumper, yaml.CSafeDumper)


@pytest.mark.parametrize("value", AWKWARD, ids=range(len(AWKWARD)))
def test_awkward_values_read_back_the_same(value: Any) -> None:
    assert yaml.safe_load(dump.to_yaml(value)) == value
    assert yaml.safe_load(dump.to_yaml(value)) == yaml.safe_load(with_pure_python(value))


def test_where_the_emitters_differ_both_read_back_the_same() -> None:
    """Known differences (libyaml escapes characters beyond the BMP and folds lines beyond the width)."""
    value = {"emoji": "🙂", "long": "x " * 3000}
    assert dump.to_yaml(value) != with_pure_python(value)
    assert yaml.safe_load(dump.to_yaml(value)) == yaml.safe_load(with_pure_python(value)) == value


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_the_same_bytes(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = validate(yaml.safe_load(example.read_text()))
    fast = render_yaml(job)
    monkeypatch.setattr(dump, "_Dumper", PurePythonDumper)
    assert fast == render_yaml(job)
