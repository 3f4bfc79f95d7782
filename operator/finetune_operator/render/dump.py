"""Deterministic serialisation of rendered values.

The renderer never builds YAML or JSON *text* from user strings: it builds dicts and dumps them here. That is
what makes a dataset path or a served model name containing ``"\\n---\\nkind: Secret"`` harmless (it stays a
quoted scalar), and sorting keys is what makes the output byte-identical for the same input.

Strings that look like something else are quoted. PyYAML quotes what *its* YAML 1.1 reader would retype
(``"yes"``, ``"1.0"``), but kubectl reads YAML with Go (sigs.k8s.io/yaml), which also types ``1e3``, ``0o17``,
``0x_1F``, ``1_000``, ``y`` and ``n``, and a YAML 1.2 reader types ``1e3`` and ``0o17`` too. Left plain, an env
value ``1e3`` reaches the API server as a number and the object is refused. :func:`retyped` is the union of
those readers' rules; such strings are dumped single-quoted.

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
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml


class _Dumper(yaml.CSafeDumper):
    """SafeDumper that never emits aliases (``&id001``): rendered objects share sub-dicts by construction."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


#: YAML 1.2 core schema, YAML 1.1 and Go (go-yaml v2 as used by kubectl): words read as booleans or null.
_WORDS = frozenset(
    w
    for base in ("y", "yes", "n", "no", "true", "false", "on", "off", "null")
    for w in (base, base.capitalize(), base.upper())
) | {"~", "", "<<", "="}
#: Numbers of YAML 1.2 (core), YAML 1.1 (sexagesimal, underscores, ``0b``) and Go (``strconv.ParseInt`` base 0
#: and go-yaml's float pattern after go-yaml strips every ``_``).
_NUMBER = re.compile(
    r"""[-+]?(
        0[xX][0-9a-fA-F]+ | 0[oO][0-7]+ | 0[bB][01]+ | [0-9]+
      | (\.[0-9]+ | [0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
      | \.(inf|Inf|INF) | [0-9]+(:[0-5]?[0-9])+(\.[0-9]*)?
    )|\.(nan|NaN|NAN)""",
    re.X,
)


def retyped(text: str) -> bool:
    """Whether some YAML reader (1.1, 1.2, or Go's as used by kubectl) reads the plain scalar ``text`` as
    something other than a string."""
    if text in _WORDS:
        return True
    if not text or text[0] not in "0123456789+-.":
        return False
    return bool(_NUMBER.fullmatch(text) or _NUMBER.fullmatch(text.replace("_", "")))


def _str_representer(dumper: yaml.representer.SafeRepresenter, data: str) -> yaml.ScalarNode:
    """Multi-line strings (the files inside ConfigMaps) as literal blocks: readable and diffable; strings that
    a YAML reader would retype, single-quoted."""
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    if retyped(data):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'")
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
