"""Every Secret key a spec names, with the field that names it: for messages about a missing Secret.

The walk is generic over the API models (every :class:`~finetune_operator.api.types.SecretKeyRef`, at any
depth, named by its wire path), so a new credential field is covered without a list to keep in step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from finetune_operator.api.types import SecretKeyRef


def secret_fields(model: BaseModel, prefix: str = "spec") -> Iterator[tuple[str, SecretKeyRef]]:
    """(wire path, reference) of every Secret reference in ``model`` (a spec), in field order."""
    yield from _walk(model, prefix)


def _walk(value: Any, path: str) -> Iterator[tuple[str, SecretKeyRef]]:
    if isinstance(value, SecretKeyRef):
        yield path, value
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            yield from _walk(getattr(value, name), f"{path}.{info.alias or name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")


def fields_naming(model: BaseModel, secret: str, key: str | None = None) -> list[str]:
    """The wire paths of the references to Secret ``secret`` (and ``key``, when given)."""
    return [p for p, ref in secret_fields(model) if ref.name == secret and (key is None or ref.key == key)]
