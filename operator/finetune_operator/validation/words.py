"""How errors read: wire paths, value kinds and "did you mean" hints, shared by every pass."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from typing import Any

from finetune_operator.errors import FieldError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def join(path: str, key: object) -> str:
    """``path.key``, or ``path["key"]`` for map keys that are not identifiers (``nvidia.com/gpu.product``).

    A key that is not a string (YAML ``1:``, ``on:``, ``null:``) is written as YAML would show it.
    """
    if not isinstance(key, str):
        key = "null" if key is None else str(key).lower() if isinstance(key, bool) else repr(key)
        return f"{path}[{key}]"
    if _IDENTIFIER.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def hint(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` when ``word`` is close to a candidate, else ``""``."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def kind(value: Any) -> str:
    """A value's type in YAML words (``a mapping``, ``an integer``, ``null``)."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def dedupe(errors: list[FieldError]) -> list[FieldError]:
    """The same (path, message) once, first occurrence first."""
    seen: set[tuple[str, str]] = set()
    out: list[FieldError] = []
    for err in errors:
        key = (err.path, err.message)
        if key not in seen:
            seen.add(key)
            out.append(err)
    return out
