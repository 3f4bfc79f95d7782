"""Loading: YAML text to plain Python documents, read the way ``kubectl apply`` reads them.

Decisions (each one a place where PyYAML's defaults and the API server disagree):

* YAML 1.2 numbers: ``1e-4`` is a float (PyYAML's YAML 1.1 needs a dot).
* A duplicate key is an error (kubectl refuses it; PyYAML would keep the last value silently).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.errors import FieldError, SpecError
from finetune_operator.validation.words import kind

__all__ = ["load_documents"]


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Read every YAML document of ``path`` (``-`` for stdin), skipping empty ones.

    Raises :class:`SpecError` with the line and column on a YAML syntax error or a document that is not a
    mapping; :class:`OSError` when the file cannot be read (the CLI maps that to a usage error).
    """
    import sys

    name = str(path)
    text = sys.stdin.read() if name == "-" else Path(path).read_text(encoding="utf-8")
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        raise SpecError([FieldError("<yaml>", f"YAML error at {where}: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([FieldError("<yaml>", f"YAML error: {exc}")]) from None
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise SpecError([FieldError(f"<document {i + 1}>", f"expected a mapping, got {kind(doc)}")])
        out.append(doc)
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads like ``kubectl apply`` does.

    * ``1e-4`` is a float, as in Kubernetes (YAML 1.2 / JSON numbers) and OmegaConf. PyYAML follows YAML 1.1,
      where a float needs a dot (``1.0e-4``); ``learning_rate: 1e-4`` would otherwise be the *string* "1e-4"
      here but a number for the API server, and the two paths would disagree.
    * A duplicate key is an error (kubectl refuses it too); PyYAML would silently keep the last value, so a
      second ``args:`` block would quietly replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
