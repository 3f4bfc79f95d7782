"""The input check of a training stage (cheap, no LLaMA-Factory import; the deeper data check through
LLaMA-Factory's own pipeline is :mod:`.datacheck`): every dataset file parses, has the columns its entry names, and the
model folder has a tokenizer. Errors name the dataset, the file and the line (exit 3; 4 for the model).

Why before the launch: LLaMA-Factory (through ``datasets``) reports a corrupt row N as a
``DatasetGenerationError`` without file or row, and a missing column as ``KeyError: 'messages'``, minutes into
a pod's life (after the image pull and the model load); and a model folder without tokenizer files trains
"successfully" on an empty tokenizer. The whole file is read (LLaMA-Factory reads all of it anyway); JSON
arrays larger than :data:`MAX_JSON_ARRAY_BYTES` are left to LLaMA-Factory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from finetune_operator.errors import DataError, ModelNotFoundError

#: A JSON array is parsed in one piece (memory grows with it): larger files get the first-record check only.
MAX_JSON_ARRAY_BYTES = 256 << 20

#: LLaMA-Factory's column defaults per formatting (``DatasetAttr``) when the entry has no ``columns`` block.
LF_DEFAULT_COLUMNS: Mapping[str, Mapping[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}

#: Files any of which makes a tokenizer transformers can load (fast tokenizer, SentencePiece, BPE vocab, ...).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "tiktoken.model",
    "qwen.tiktoken",
)


def check_tokenizer(model_dir: Path) -> None:
    """A base model folder must carry tokenizer files (``tokenizer_config.json`` alone loads an empty one)."""
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES) or any(model_dir.glob("*.tiktoken")):
        return
    raise ModelNotFoundError(
        f"model {model_dir} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): training would use an "
        "empty tokenizer; copy the tokenizer next to config.json"
    )


def check_dataset_file(path: Path, name: str, entry: Mapping[str, Any]) -> None:
    """Parse every record of a ``.json``/``.jsonl`` dataset and check the columns its entry names."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        return
    if path.stat().st_size == 0:
        raise DataError(f"dataset {name!r}: {path} is empty")
    if suffix == ".jsonl" or not _starts_with_bracket(path):
        keys = _jsonl_keys(path, name)
    elif path.stat().st_size <= MAX_JSON_ARRAY_BYTES:
        keys = _array_keys(path, name)
    else:
        return
    _check_columns(path, name, entry, keys)


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _jsonl_keys(path: Path, name: str) -> set[str]:
    keys: set[str] = set()
    rows = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"dataset {name!r}: {path} line {number} is not UTF-8 text ({exc.reason})") from None
            except ValueError as exc:
                if number == 1 and path.suffix.lower() == ".json":
                    # not JSON lines after all: a pretty-printed object; let the array reader say where it breaks
                    return _array_keys(path, name)
                raise DataError(f"dataset {name!r}: {path} line {number} is not JSON: {exc}") from None
            keys.update(_record_keys(record, path, name, f"line {number}"))
            rows += 1
    if rows == 0:
        raise DataError(f"dataset {name!r}: {path} has no records")
    return keys


def _array_keys(path: Path, name: str) -> set[str]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset {name!r}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"dataset {name!r}: {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    records: Iterable[Any] = data if isinstance(data, list) else [data]
    keys: set[str] = set()
    count = 0
    for i, record in enumerate(records):
        keys.update(_record_keys(record, path, name, f"record {i + 1}"))
        count += 1
    if count == 0:
        raise DataError(f"dataset {name!r}: {path} has no records")
    return keys


def _record_keys(record: Any, path: Path, name: str, where: str) -> Iterable[str]:
    if not isinstance(record, dict):
        raise DataError(f"dataset {name!r}: {path} {where} is not a JSON object (got {type(record).__name__})")
    return record.keys()


def _check_columns(path: Path, name: str, entry: Mapping[str, Any], keys: set[str]) -> None:
    formatting = str(entry.get("formatting") or "alpaca")
    columns = entry.get("columns")
    if not isinstance(columns, Mapping):
        columns = LF_DEFAULT_COLUMNS.get(formatting, {})
    # LLaMA-Factory reads every named column of every row (``example[column]``): a column may be empty or
    # missing in some rows, but not absent from the whole file.
    required = [(field, col) for field, col in columns.items() if isinstance(col, str) and col]
    missing = [(field, col) for field, col in required if col not in keys]
    if missing:
        field, col = missing[0]
        found = ", ".join(sorted(keys)) or "none"
        raise DataError(
            f"dataset {name!r}: {path} has no column {col!r} (the {field} column of {formatting} data; columns "
            f"found: {found}): fix the file or set spec.datasets[].columns.{_camel(field)}"
        )


def _camel(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(p.capitalize() for p in rest)
