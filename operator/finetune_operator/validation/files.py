"""Files with several documents: which documents are FineTuneJobs, and problems between them.

``ftctl validate``, ``render`` and ``run`` read files the same way through these functions, so a file that
``validate`` calls ok is one ``render`` renders:

* Documents of other kinds (a ConfigMap next to the job, as in a GitOps folder) are skipped by all three. A
  document of our API group with a misspelled kind is *not* skipped: it is validated and the kind reported.
* Two FineTuneJobs with the same namespace and name in one file are an error: ``kubectl apply`` would apply
  the second over the first, and ``render -o DIR`` would mix their files in ``DIR/<name>/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.constants import GROUP, KIND
from finetune_operator.errors import FieldError

__all__ = ["duplicate_names", "finetune_jobs", "is_finetune_job"]


def is_finetune_job(doc: Mapping[str, Any]) -> bool:
    """A FineTuneJob, or a document of our API group (a misspelled kind is reported, not skipped)."""
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    return kind in (None, KIND) or (isinstance(api_version, str) and api_version.startswith(f"{GROUP}/"))


def finetune_jobs(docs: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """``(index in the file, document)`` of every FineTuneJob document."""
    return [(i, d) for i, d in enumerate(docs) if is_finetune_job(d)]


def _key(doc: Mapping[str, Any]) -> tuple[str, str] | None:
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    ns = meta.get("namespace")
    return (ns if isinstance(ns, str) and ns else "default", meta["name"])


def duplicate_names(jobs: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[int, list[FieldError]]:
    """Errors by document index for every FineTuneJob that repeats an earlier one's namespace and name."""
    first: dict[tuple[str, str], int] = {}
    out: dict[int, list[FieldError]] = {}
    for index, doc in jobs:
        key = _key(doc)
        if key is None:
            continue
        if key in first:
            out[index] = [
                FieldError(
                    "metadata.name",
                    f"{KIND} {key[0]}/{key[1]} is already defined in document {first[key] + 1} of this file",
                )
            ]
        else:
            first[key] = index
    return out
