"""The data check's result, as plain data (the check itself runs LLaMA-Factory: ``worker/datacheck.py``).

Kept here, in the pure package, so that the estimator, ``ftctl plan``'s output and ``status.plan`` share one
shape without importing LLaMA-Factory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Why a row is dropped (the keys of ``DatasetStats.dropped``).
DROP_REASONS: dict[str, str] = {
    "malformed": "not valid JSON, or not an object",
    "missing_columns": "a column the dataset's mapping names is absent",
    "empty": "no text in the prompt and the response",
    "wrong_roles": "messages do not alternate user/assistant as the tags say",
    "wrong_turns": "wrong number of messages (sft: pairs; ranking data: an odd prompt)",
    "invalid": "LLaMA-Factory's processor drops it (no response, or a malformed preference pair)",
    "media": "an image, video or audio it names is missing from the media folder or unreadable",
}


@dataclass
class DatasetStats:
    """One dataset of one stage, after LLaMA-Factory's conversion and tokenisation."""

    name: str
    file: str
    rows: int = 0
    valid: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    """``FILE:LINE: reason`` of the first dropped row."""
    lengths: list[int] = field(default_factory=list)
    """Token length of each valid sample before truncation (pairs: the longer of chosen/rejected)."""
    tokens: int = 0
    """Tokens trained on after truncation (pairs: chosen + rejected)."""
    truncated: int = 0
    """Samples longer than cutoff_len."""
    error: str | None = None
    """The dataset could not be read at all (missing file, unsupported format)."""
    unparseable: str | None = None
    """``FILE:LINE`` of the first row that is not valid JSON: LLaMA-Factory's loader (the datasets JSON
    builder) fails on the whole file, so one such row makes the dataset unusable."""

    def percentiles(self) -> dict[str, int]:
        return percentiles(self.lengths)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "file": self.file,
            "rows": self.rows,
            "valid": self.valid,
            "dropped": dict(sorted(self.dropped.items())),
            "tokens": self.tokens,
            "truncated": self.truncated,
            "lengthPercentiles": self.percentiles(),
        }
        if self.first_error:
            out["firstError"] = self.first_error
        if self.error:
            out["error"] = self.error
        if self.unparseable:
            out["unparseable"] = self.unparseable
        return out


def percentiles(values: list[int]) -> dict[str, int]:
    """p50/p90/p99/max by the nearest-rank method (empty: {})."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for p in (50, 90, 99):
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[f"p{p}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    return out


@dataclass
class StageData:
    """Every dataset of one stage, and what they add up to."""

    stage: str
    cutoff_len: int
    datasets: list[DatasetStats]
    max_samples: int | None = None

    @property
    def samples(self) -> int:
        if self.max_samples is None:
            return sum(d.valid for d in self.datasets)
        return sum(min(d.valid, self.max_samples) for d in self.datasets)

    @property
    def tokens(self) -> int:
        total = 0
        for d in self.datasets:
            if self.max_samples is not None and d.valid > self.max_samples and d.valid:
                total += round(d.tokens * self.max_samples / d.valid)
            else:
                total += d.tokens
        return total

    @property
    def longest(self) -> int:
        return max((max(d.lengths) for d in self.datasets if d.lengths), default=0)

    @property
    def truncated(self) -> int:
        return sum(d.truncated for d in self.datasets)

    @property
    def problems(self) -> list[str]:
        """Reasons the data is unusable: a dataset that cannot be read, or a stage with no valid sample."""
        out = [f"dataset {d.name}: {d.error}" for d in self.datasets if d.error]
        out += [
            f"dataset {d.name}: {d.unparseable} is not valid JSON (LLaMA-Factory's loader fails on the whole file)"
            for d in self.datasets
            if d.unparseable and not d.error
        ]
        if not out and self.samples == 0:
            first = next((d.first_error for d in self.datasets if d.first_error), None)
            out.append("no valid samples" + (f" (first problem: {first})" if first else ""))
        return out

    def to_json(self) -> dict[str, Any]:
        lengths = [n for d in self.datasets for n in d.lengths]
        return {
            "cutoffLen": self.cutoff_len,
            "samples": self.samples,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "lengthPercentiles": percentiles(lengths),
            "datasets": [d.to_json() for d in self.datasets],
        }
