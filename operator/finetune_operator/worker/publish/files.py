"""The files of a model folder as the publishers see them: relative path, size, SHA-256.

Hidden files (our completion markers, caches, ``.partial`` folders) are not part of a published model. The
hashes are computed once and shared by every destination.
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


def collect(root: Path) -> list[LocalFile]:
    """Every file to publish under ``root``, in a stable order."""
    return [
        LocalFile(path=p, rel=p.relative_to(root).as_posix(), size=p.stat().st_size, sha256=sha256_file(p))
        for p in iter_files(root)
    ]
