"""Parse a FineTuneJob *leniently*: every field that has the right type is kept, every other one falls back.

Why: the semantic rules must run even when the shape pass found errors (a typo in one field must not hide an
undeclared dataset in another), yet they should read typed models, not raw dicts, so that defaults come from
the types once (LoRA rank, ZeRO stage, GPUs per node, method...) instead of being restated in every rule.

Each field is checked against its annotation alone (type, strict; no length/pattern constraints, which the
shape pass reports). A field with the wrong type takes its default; a *required* field with the wrong type or
missing is ``None`` (rules skip it: the shape pass already reported it). Nested models are parsed the same
way, and a list of models keeps every position (a non-mapping item becomes ``None``, which
:class:`~finetune_operator.validation.context.Context` skips), so an index in the lenient model is the index
on the wire.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any, TypeVar, Union, get_args, get_origin

import pydantic

__all__ = ["parse"]

M = TypeVar("M", bound=pydantic.BaseModel)


def parse(cls: type[M], raw: Any) -> M:
    """``cls`` built from ``raw`` without raising (see the module docstring)."""
    data = raw if isinstance(raw, Mapping) else {}
    values: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        key = info.alias or name
        if key in data:
            ok, value = _field(info.annotation, data[key])
            if ok:
                values[name] = value
                continue
        if info.is_required():
            values[name] = None
    return cls.model_construct(**values)


def _field(annotation: Any, value: Any) -> tuple[bool, Any]:
    model = _model(annotation)
    if model is not None:
        if value is None and _optional(annotation):
            return True, None
        if isinstance(value, Mapping):
            return True, parse(model, value)
        return False, None
    origin = get_origin(annotation)
    if origin is list:
        item = _model(get_args(annotation)[0])
        if item is not None:
            if not isinstance(value, list):
                return False, None
            return True, [parse(item, v) if isinstance(v, Mapping) else None for v in value]
    try:
        return True, _adapter(annotation).validate_python(value, strict=True)
    except (pydantic.ValidationError, TypeError, ValueError, RecursionError):
        return False, None


@functools.cache
def _adapter(annotation: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(annotation)


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _optional(annotation: Any) -> bool:
    return type(None) in _members(annotation)


def _model(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The model class of ``X`` or ``X | None``; None for anything else."""
    found = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, pydantic.BaseModel)]
    others = [m for m in _members(annotation) if m is not type(None) and m not in found]
    return found[0] if len(found) == 1 and not others else None
