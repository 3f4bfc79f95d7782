"""The files of a model folder as the publishers see them: relative path, size, SHA-256.

Hidden files (our completion markers, caches, ``.partial`` folders) are not part of a published model, nor
are a training stage's intermediate ``checkpoint-*`` folders and TensorBoard ``runs/`` (an adapter is published
from its stage's output folder, which keeps them for resuming). The hashes are computed once and shared by
every destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune_operator.worker.lineage import iter_files, sha256_file


@dataclass(frozen=True)
class LocalFile:
    path: Path
    rel: str
    size: int
    sha256: str


def published(rel: Path) -> bool:
    """Whether a file (path relative to the model folder) belongs to the published model."""
    top = rel.parts[0]
    return not (len(rel.parts) > 1 and (top.startswith("checkpoint-") or top == "runs"))


def collect(root: Path) -> list[LocalFile]:
    """Every file to publish under ``root``, in a stable order."""
    return [
        LocalFile(path=p, rel=p.relative_to(root).as_posix(), size=p.stat().st_size, sha256=sha256_file(p))
        for p in iter_files(root)
        if published(p.relative_to(root))
    ]
