"""Deterministic serialisation of rendered values.

The renderer never builds YAML or JSON *text* from user strings: it builds dicts and dumps them here. That is
what makes a dataset path or a served model name containing ``"\\n---\\nkind: Secret"`` harmless (it stays a
quoted scalar), and sorting keys is what makes the output byte-identical for the same input.

Floats: PyYAML dumps ``1e-05`` as ``1.0e-05`` (it inserts the ``.0``), which both PyYAML's ``safe_load`` and
OmegaConf (LLaMA-Factory's loader) read back as a float; ``1e-05`` without the dot would be a string to PyYAML.

The emitter is libyaml's (``CSafeDumper``; every PyYAML wheel has it), always, never a fallback: a quarter of
the pure-Python emitter's CPU (rendering is most of what the operator spends on a new FineTuneJob, and after a
restart 1000 arrive at once), and one emitter everywhere keeps the output byte-identical across machines. It
writes the same bytes as the pure-Python emitter for every example; for strings outside the printable BMP and
lines beyond the width it escapes or folds differently, reading back to the same value
(tests/test_render_dump.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml


class _Dumper(yaml.CSafeDumper):
    """SafeDumper that never emits aliases (``&id001``): rendered objects share sub-dicts by construction."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.representer.SafeRepresenter, data: str) -> yaml.ScalarNode:
    """Multi-line strings (the files inside ConfigMaps) as literal blocks: readable and diffable."""
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def to_yaml(value: Mapping[str, Any]) -> str:
    """One YAML document, keys sorted, block style, unicode kept readable."""
    return yaml.dump(
        dict(value), Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=4096
    )


def to_yaml_documents(values: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream (``---`` separated), each document dumped by :func:`to_yaml`."""
    return "".join(f"---\n{to_yaml(v)}" for v in values)


def to_json(value: Any) -> str:
    """JSON with sorted keys and a trailing newline (stable diffs in ConfigMaps and golden files)."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
