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


#: The API server refuses request bodies over 3 MiB; a FineTuneJob file larger than that is a mistake (or an
#: attack on the reader), refused before it is parsed.
MAX_FILE_BYTES = 3 * 1024 * 1024
#: Nesting deeper than this is no FineTuneJob (the schema is about ten levels deep; free-form ``args`` rarely
#: reach three). Without a bound, 20,000 ``[`` exhaust Python's recursion limit inside PyYAML.
MAX_DEPTH = 100
#: Nodes a file may expand to, counting every alias as the whole subtree it names. Aliases are legal YAML (and
#: kubectl reads them), but nine nested levels of nine aliases ("billion laughs") turn 800 bytes into 10^9
#: nodes: gigabytes and minutes, then MemoryError.
MAX_NODES = 100_000


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Read every YAML document of ``path`` (``-`` for stdin), skipping empty ones.

    Raises :class:`SpecError` with the line and column on a YAML syntax error, a document that is not a
    mapping, a recursive alias, too deep nesting, too many expanded nodes, a file over
    :data:`MAX_FILE_BYTES` or text that is not UTF-8; :class:`OSError` when the file cannot be read (the CLI
    maps that to a usage error).
    """
    import sys

    name = str(path)
    data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1) if name == "-" else _read_bytes(Path(path))
    if len(data) > MAX_FILE_BYTES:
        raise SpecError([FieldError("<file>", f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SpecError(
            [FieldError("<file>", f"not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} (save it as UTF-8)")]
        ) from None
    return parse_documents(text)


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as handle:  # IsADirectoryError / FileNotFoundError: OSError for the caller
        return handle.read(MAX_FILE_BYTES + 1)


def parse_documents(text: str) -> list[dict[str, Any]]:
    """Every YAML document of ``text`` (see :func:`load_documents`)."""
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        raise SpecError([FieldError("<yaml>", f"YAML error at {where}: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([FieldError("<yaml>", f"YAML error: {exc}")]) from None
    except RecursionError:  # a second line of defence behind MAX_DEPTH
        raise SpecError([FieldError("<yaml>", "nested too deeply")]) from None
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
    * Bounded (:data:`MAX_DEPTH`, :data:`MAX_NODES`) and acyclic: a recursive alias (``&a [*a]``) would make a
      structure that contains itself, which JSON (and so the API server) cannot hold.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._open: set[str] = set()
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            anchor = event.anchor
            if anchor in self._open:
                raise _error(f"recursive alias *{anchor}: an object cannot contain itself", event)
            if anchor in self.anchors:
                self._count(self._size(self.anchors[anchor]), event)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)
        self._count(1, event)
        return node

    def _count(self, n: int, event: Any) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise _error(
                f"expands to more than {MAX_NODES} values (aliases count as the whole value they repeat)", event
            )

    def _size(self, node: yaml.Node) -> int:
        """Nodes in ``node`` with every alias expanded (memoized: aliases share node objects)."""
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._size(k) + self._size(v) for k, v in node.value)
        self._sizes[id(node)] = size
        return size

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


def _error(problem: str, event: Any) -> yaml.composer.ComposerError:
    return yaml.composer.ComposerError(None, None, problem, event.start_mark)


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
