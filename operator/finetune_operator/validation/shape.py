"""Pass 1, shape: pydantic's strict validation errors turned into wire paths and sentences.

The pydantic models in :mod:`finetune_operator.api.types` run in strict mode (so ``retries: "2"`` fails here
exactly as it fails in the API server's schema). Pydantic's locations are followed through the input to form
wire paths (``spec.stages[1].datasets[0]``, camelCase; union tags dropped) and its messages become sentences
with "did you mean" hints. One sentence per path: union members that each report "not a string", "not a list"
are folded into "expected a string or a list".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

import pydantic

from finetune_operator.api import patterns
from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import FieldError
from finetune_operator.validation.words import hint, join, kind

__all__ = ["non_string_keys", "shape_errors"]


def shape_errors(exc: pydantic.ValidationError, obj: Mapping[str, Any]) -> list[FieldError]:
    grouped: dict[str, list[str]] = {}
    expected: dict[str, tuple[list[str], Any]] = {}
    for err in exc.errors(include_url=False):
        path, model = _wire_path(err["loc"], obj, err["type"])
        grouped.setdefault(path, [])
        word = _EXPECTED_TYPE.get(err["type"])
        if word is not None:
            # Union members each report a failure ("not a string", "not a list"): one sentence per path.
            words, _ = expected.setdefault(path, ([], err.get("input")))
            if word not in words:
                words.append(word)
            continue
        message = _shape_message(err, model)
        if message not in grouped[path]:
            grouped[path].append(message)
    for path, (words, value) in expected.items():
        grouped[path].append(f"wrong type: expected {' or '.join(words)}, got {kind(value)}")
    return [FieldError(path, "; ".join(msgs)) for path, msgs in grouped.items() if msgs]


_EXPECTED_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _wire_path(loc: tuple[int | str, ...], obj: Any, err_type: str) -> tuple[str, Any]:
    """Follow ``loc`` through the input: keys/indexes that exist form the path, union tags are dropped.

    Returns the path and the pydantic model class whose field the last element names (for hints).
    """
    path = ""
    cur: Any = obj
    annotation: Any = FineTuneJob
    owner: Any = None
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(cur, list) and 0 <= part < len(cur):
            path += f"[{part}]"
            cur = cur[part]
            annotation = _item_annotation(annotation)
        elif isinstance(part, str) and isinstance(cur, Mapping) and (part in cur or (last and err_type == "missing")):
            owner = _model_of(annotation)
            path = join(path, part)
            cur = cur.get(part)
            annotation = _field_annotation(owner, part) if owner is not None else _item_annotation(annotation)
        # anything else is a union tag ('str', 'list[str]', ...) that names no wire field
    return path or "<document>", owner


def _model_of(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for member in get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else ():
        model = _model_of(member)
        if model is not None:
            return model
    return None


def _field_annotation(model: type[pydantic.BaseModel], alias: str) -> Any:
    for name, info in model.model_fields.items():
        if alias in (info.alias, name):
            return info.annotation
    return None


def _item_annotation(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (Union, type(int | None)):
        for member in get_args(annotation):
            inner = _item_annotation(member)
            if inner is not None:
                return inner
        return None
    if origin is list:
        return get_args(annotation)[0]
    if origin is dict:
        return get_args(annotation)[1]
    return None


def _field_aliases(model: type[pydantic.BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _shape_message(err: Mapping[str, Any], model: type[pydantic.BaseModel] | None) -> str:
    err_kind = err["type"]
    ctx = err.get("ctx") or {}
    loc = err["loc"]
    if err_kind == "extra_forbidden":
        key = str(loc[-1])
        return f"unknown field {key!r}{hint(key, _field_aliases(model))}"
    if err_kind == "missing":
        return "required field is missing"
    if err_kind == "literal_error":
        value = err.get("input")
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected)
        suggestion = hint(str(value), choices) if isinstance(value, str) else ""
        return f"unsupported value {value!r}: expected {expected}{suggestion}"
    if err_kind == "string_pattern_mismatch":
        return f"invalid value {err.get('input')!r}: {_pattern_reason(str(ctx.get('pattern', '')))}"
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


def _pattern_reason(pattern: str) -> str:
    if pattern == patterns.DNS_LABEL_PATTERN:
        return "must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)"
    if pattern == patterns.DNS_SUBDOMAIN_PATTERN:
        return "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
    if pattern == patterns.DATASET_NAME_PATTERN:
        return "must be letters, digits, '-', '_' or '.' (starting and ending alphanumeric; no commas or '/')"
    if pattern == patterns.IMAGE_PATTERN:
        return "must be an image reference ([registry/]repository[:tag][@digest], lowercase, no spaces)"
    if pattern == patterns.SERVED_MODEL_NAME_PATTERN:
        return "must be a model id: letters, digits and '-._:/@+', no spaces or newlines"
    return f"must match {pattern}"


def non_string_keys(value: Any, path: str = "") -> list[FieldError]:
    """Every mapping key that is not a string, at its own path.

    JSON (and so the API server) has string keys only; YAML reads ``1:``, ``null:`` and YAML 1.1's ``on:`` as a
    number, null or boolean. Pydantic would report "wrong type" at the mapping instead of naming the key.
    """
    out: list[FieldError] = []
    if isinstance(value, Mapping):
        for key, child in value.items():
            where = join(path, key)
            if not isinstance(key, str):
                out.append(
                    FieldError(
                        where, f"keys must be strings, got {kind(key)}: quote the key (YAML reads it as {kind(key)})"
                    )
                )
            else:
                out.extend(non_string_keys(child, where))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out.extend(non_string_keys(child, f"{path}[{i}]"))
    return out
