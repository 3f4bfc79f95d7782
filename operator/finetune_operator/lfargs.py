"""LLaMA-Factory's training arguments as data: names, accepted JSON types and choices, plus the template names
and the media each template reads.

Why a generated table: the operator and ``ftctl validate`` must reject a misspelled or mistyped ``args`` key
*before* a GPU pod starts, but the operator image must not carry torch and LLaMA-Factory just to know the
argument names. So :func:`generate` reads LLaMA-Factory's own dataclasses (``ModelArguments``,
``DataArguments``, ``TrainingArguments`` (transformers' ``Seq2SeqTrainingArguments`` underneath),
``FinetuningArguments``, ``GeneratingArguments`` -- exactly what ``llamafactory-cli train`` parses) and the
``TEMPLATES`` registry (names, and which media -- images, videos, audios -- each template's multimodal plugin
takes: LLaMA-Factory refuses media a template has no placeholder token for, but only once the data is being
tokenised in a training pod), and writes ``lf_arguments.json`` next to this module. At runtime only the JSON is read.
``tests/test_lfargs.py`` regenerates the table from the installed llamafactory and fails on drift, so an
upgrade of LLaMA-Factory cannot silently leave the table behind.

Regenerate with ``python -m finetune_operator.lfargs --write`` in an environment with the ``train`` extra.

Type names in the table: ``bool``, ``int``, ``float``, ``str``, ``list``, ``dict``, ``null`` and ``any``
(a Python class we cannot check from JSON). ``choices`` is present when LLaMA-Factory or transformers accept
only listed values (``Literal`` fields, and ``Enum`` fields, which transformers converts with ``Enum(value)``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The committed table, shipped as package data.
TABLE_PATH = Path(__file__).with_name("lf_arguments.json")

#: The dataclasses ``llamafactory-cli train`` parses, in its order (``llamafactory.hparams.parser._TRAIN_ARGS``).
ARGUMENT_CLASSES = (
    "ModelArguments",
    "DataArguments",
    "TrainingArguments",
    "FinetuningArguments",
    "GeneratingArguments",
)


@dataclass(frozen=True)
class ArgSpec:
    """One LLaMA-Factory argument: which dataclass defines it, the JSON types it accepts, its choices."""

    name: str
    group: str
    types: tuple[str, ...]
    choices: tuple[Any, ...] | None = None

    def accepts_type(self, value: Any) -> bool:
        """Whether ``value`` (as parsed from YAML) has one of the accepted types.

        Strict on purpose: ``parse_dict`` of transformers' ``HfArgumentParser`` passes values to the dataclass
        unconverted, so ``learning_rate: "abc"`` or ``max_steps: 5.5`` would only fail (or misbehave) deep in a
        training pod. An int is accepted where a float is expected; a bool is never an int.
        """
        return any(_is_type(value, t) for t in self.types)


def _is_type(value: Any, type_name: str) -> bool:
    if type_name == "any":
        return True
    if type_name == "null":
        return value is None
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    if type_name == "list":
        return isinstance(value, list)
    if type_name == "dict":
        return isinstance(value, dict)
    raise ValueError(f"unknown type name {type_name!r} in {TABLE_PATH.name}")


@dataclass(frozen=True)
class LfTable:
    """The loaded table."""

    llamafactory_version: str
    transformers_version: str
    arguments: Mapping[str, ArgSpec]
    templates: frozenset[str]
    template_media: Mapping[str, frozenset[str]]
    """Template -> the media columns (``images``, ``videos``, ``audios``) its multimodal plugin accepts; a
    template that is absent accepts none (text only)."""


@functools.cache
def load() -> LfTable:
    """The committed table (read once per process)."""
    raw = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    args = {
        name: ArgSpec(
            name=name,
            group=str(spec["group"]),
            types=tuple(spec["types"]),
            choices=tuple(spec["choices"]) if "choices" in spec else None,
        )
        for name, spec in raw["arguments"].items()
    }
    return LfTable(
        llamafactory_version=str(raw["llamafactory_version"]),
        transformers_version=str(raw["transformers_version"]),
        arguments=args,
        templates=frozenset(raw["templates"]),
        template_media={name: frozenset(media) for name, media in raw["template_media"].items()},
    )


# ----------------------------------------------------------------------------------------------------------
# Generation (needs the `train` extra; never called at runtime)
# ----------------------------------------------------------------------------------------------------------


def _describe_type(tp: Any) -> tuple[set[str], list[Any] | None]:
    """JSON types and choices of one annotation (recursing through unions)."""
    import enum
    import pathlib
    import types
    import typing

    origin = typing.get_origin(tp)
    if tp is type(None):
        return {"null"}, None
    if origin is typing.Union or origin is types.UnionType:
        names: set[str] = set()
        choice_parts: list[list[Any] | None] = []
        for member in typing.get_args(tp):
            member_types, member_choices = _describe_type(member)
            names |= member_types
            if member is not type(None):
                choice_parts.append(member_choices)
        enumerated = [c for c in choice_parts if c is not None]
        # Choices survive a union when every other member is a plain str (transformers' `Enum | str`, converted
        # with Enum(value) in __post_init__) or None; a union with any other free type accepts anything of it.
        free = [c for c in choice_parts if c is None]
        if enumerated and len(free) <= 1 and (not free or names - {"null"} == {"str"}):
            merged: list[Any] = []
            for part in enumerated:
                merged.extend(v for v in part if v not in merged)
            return names, merged
        return names, None
    if origin is typing.Literal:
        values = list(typing.get_args(tp))
        lit_types = {_json_type_of(v) for v in values}
        return lit_types, values
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        return {_json_type_of(v) for v in values}, values
    if origin in (list, tuple, set, typing.List, typing.Sequence):  # noqa: UP006
        return {"list"}, None
    if origin in (dict, typing.Dict, typing.Mapping):  # noqa: UP006
        return {"dict"}, None
    if tp is bool:
        return {"bool"}, None
    if tp is int:
        return {"int"}, None
    if tp is float:
        return {"float"}, None
    if tp is str or tp is pathlib.Path:
        return {"str"}, None
    if tp in (list, tuple, set):
        return {"list"}, None
    if tp is dict:
        return {"dict"}, None
    return {"any"}, None


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str"


#: LLaMA-Factory's multimodal plugin attribute -> the dataset column kind it admits.
_MEDIA_TOKENS = (("image_token", "images"), ("video_token", "videos"), ("audio_token", "audios"))


def _template_media(templates: Mapping[str, Any]) -> dict[str, list[str]]:
    """Media kinds per template, from its plugin's placeholder tokens: LLaMA-Factory's own test
    (``MMPluginMixin._validate_input``: "This model does not support image input") is that token being set."""
    out: dict[str, list[str]] = {}
    for name, template in templates.items():
        plugin = template.mm_plugin
        kinds = [kind for attr, kind in _MEDIA_TOKENS if getattr(plugin, attr, None)]
        if kinds:
            out[name] = kinds
    return out


def generate() -> dict[str, Any]:
    """Build the table from the installed llamafactory (imports torch, transformers and llamafactory)."""
    import dataclasses
    import importlib.metadata
    import os
    import typing

    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llamafactory import hparams
    from llamafactory.data.template import TEMPLATES

    arguments: dict[str, dict[str, Any]] = {}
    for class_name in ARGUMENT_CLASSES:
        cls = getattr(hparams, class_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:  # HfArgumentParser skips these too
                continue
            type_names, choices = _describe_type(hints[f.name])
            entry: dict[str, Any] = {"group": class_name, "types": sorted(type_names)}
            if choices is not None:
                entry["choices"] = choices
            arguments[f.name] = entry
    return {
        "llamafactory_version": importlib.metadata.version("llamafactory"),
        "transformers_version": importlib.metadata.version("transformers"),
        "arguments": arguments,
        "templates": sorted(TEMPLATES),
        "template_media": _template_media(TEMPLATES),
    }


def dumps(table: Mapping[str, Any]) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(table, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.lfargs", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {TABLE_PATH.name} (default: print)")
    args = parser.parse_args(argv)
    text = dumps(generate())
    if args.write:
        TABLE_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {TABLE_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["ARGUMENT_CLASSES", "TABLE_PATH", "ArgSpec", "LfTable", "dumps", "generate", "load", "main"]
