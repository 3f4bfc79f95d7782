"""Generate the API reference (``docs/api.md``) from the pydantic types.

The reference is generated, not written, for the same reason the CRD is: a hand-written copy drifts. A test
regenerates it and fails when the committed file differs (``python -m finetune_operator.api.reference``
rewrites it).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from finetune_operator.api import types as api

#: Models documented, in reading order (each links to the ones it uses).
ROOTS: tuple[type[BaseModel], ...] = (api.FineTuneJob,)


def _type_name(tp: Any) -> tuple[str, list[type[BaseModel]]]:
    """A readable type string and the models it refers to."""
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})", [tp]
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp)), []
    if origin in (types.UnionType, typing.Union):
        parts, refs = [], []
        for a in get_args(tp):
            if a is type(None):
                continue
            s, r = _type_name(a)
            parts.append(s)
            refs.extend(r)
        return " or ".join(parts), refs
    if origin is list:
        s, r = _type_name(get_args(tp)[0])
        return f"list of {s}", r
    if origin is dict:
        k, _ = _type_name(get_args(tp)[0])
        v, r = _type_name(get_args(tp)[1])
        return f"map {k} → {v}", r
    if tp is Any:
        return "any", []
    return getattr(tp, "__name__", str(tp)), []


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return ""
    if field.default is PydanticUndefined or field.default is None:
        return ""
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def render_markdown() -> str:
    """The whole reference as Markdown."""
    lines = [
        "# FineTuneJob API reference (`finetune.dev/v1alpha1`)",
        "",
        "Generated from `operator/finetune_operator/api/types.py` by `python -m finetune_operator.api.reference`;",
        "do not edit by hand. `kubectl explain ftj.spec` shows the same descriptions from the CRD.",
        "",
    ]
    seen: list[type[BaseModel]] = []
    queue: list[type[BaseModel]] = list(ROOTS)
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.append(model)
        lines += [f"## {model.__name__}", "", (model.__doc__ or "").strip(), ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            wire = field.alias or name
            tname, refs = _type_name(field.annotation)
            queue.extend(r for r in refs if r not in seen)
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{wire}` | {tname} | {_default(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


DOC_PATH = Path("docs/api.md")


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or [str(DOC_PATH)])[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
