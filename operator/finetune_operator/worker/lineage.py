"""``finetune-lineage.json``: where a model came from, written next to it and shipped with every copy.

A published model outlives the cluster that trained it; the lineage file is how a reader of any copy (hub
repo, S3 prefix, OCI artifact) answers "which base, which data, which settings, how good". It holds the base
model (hub id and revision, or a content hash when it came from a volume), the SHA-256 of every dataset file,
the hash of the FineTuneJob spec, the runId, the stages with their key hyper-parameters, the metrics of the
evaluation, the images and timestamps.

The renderer produces the static part (``lineage`` in the eval/publish step configs, everything it knows from
the spec); the worker adds what only the volumes know (file hashes, completion times, metrics) and writes the
file atomically. Writing is idempotent: the same inputs give the same file apart from ``writtenAt``, which is
kept when nothing else changed, so a re-run does not make publishing upload a "new" lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from finetune_operator.errors import WorkerError
from finetune_operator.worker import markers

LINEAGE_FILE = "finetune-lineage.json"
SCHEMA = "finetune.dev/lineage/v1"
_CHUNK = 4 * 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks (model shards are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def iter_files(root: Path) -> Iterable[Path]:
    """Regular files under ``root`` in a stable order, without our markers and caches."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        yield path


def content_hash(root: Path) -> str:
    """A hash of a folder's content (relative paths and file hashes): the identity of a model that has no
    hub revision (it was put on the volume by hand)."""
    digest = hashlib.sha256()
    for path in iter_files(root):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _dataset_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    path = Path(str(entry["path"]))
    if path.is_file():
        files = [path]
        base = path.parent
    elif path.is_dir():
        files = list(iter_files(path))
        base = path
    else:
        raise WorkerError(f"lineage: dataset {entry.get('name')!r} is missing at {path}")
    return {
        "name": entry.get("name"),
        "files": [
            {"path": p.relative_to(base).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files
        ],
    }


def _base_model(static: Mapping[str, Any]) -> dict[str, Any]:
    base = dict(static)
    path = base.pop("path", None)
    if path is None:
        return base
    done = markers.read_marker(path, markers.DOWNLOAD_COMPLETE)
    if done is not None and done.get("source") == base.get("source"):
        base["resolvedRevision"] = done.get("resolvedRevision") or done.get("revision")
    if not base.get("source") or not (base.get("resolvedRevision") or base.get("revision")):
        if not Path(path).is_dir():
            raise WorkerError(f"lineage: the base model is missing at {path}")
        base["contentHash"] = "sha256:" + content_hash(Path(path))
    return base


def build_lineage(config: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The lineage document for ``config`` (the rendered ``lineage`` block)."""
    stages = []
    for stage in config.get("stages", []):
        entry = {k: v for k, v in stage.items() if k != "outputDir"}
        if stage.get("outputDir"):
            done = markers.read_marker(stage["outputDir"])
            if done is not None and done.get("completedAt"):
                entry["completedAt"] = done["completedAt"]
        stages.append(entry)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "job": dict(config.get("job", {})),
        "runId": config.get("runId"),
        "specHash": config.get("specHash"),
        "baseModel": _base_model(config.get("baseModel", {})),
        "datasets": [_dataset_entry(d) for d in config.get("datasets", [])],
        "stages": stages,
        "artifact": config.get("artifact", "merged"),
        "images": dict(config.get("images", {})),
        "metrics": dict(metrics or {}),
    }
    return doc


def write_lineage(model_dir: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` into ``model_dir``; keeps the file untouched when its content is unchanged."""
    target = Path(model_dir) / LINEAGE_FILE
    old = read_lineage(model_dir)
    if old is not None:
        written = old.pop("writtenAt", None)
        if old == json.loads(json.dumps(dict(doc))):
            return target
        del written
    markers.write_json_atomic(target, {**doc, "writtenAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return target


def read_lineage(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lineage document in ``model_dir`` (or a lineage file's path), or ``None``."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / LINEAGE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
