"""What every semantic rule reads: the leniently parsed job, its raw form, and LLaMA-Factory's argument table.

Rules read typed models (:mod:`.lenient`), so a default is the type's default, written once in
:mod:`finetune_operator.api.types`. A field the shape pass rejected reads as its default (or ``None`` for a
required field), and a list item that is not a mapping is skipped by the accessors, so each rule checks what
it can and never re-reports a shape error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api.types import (
    DatasetSpec,
    FineTuneJob,
    FineTuneJobSpec,
    ObjectMeta,
    StageSpec,
)
from finetune_operator.lfargs import LfTable
from finetune_operator.render import chain as walker
from finetune_operator.validation import lenient
from finetune_operator.validation.policy import OFFLINE, Policy

__all__ = ["Context"]


@dataclass
class Context:
    """The object under validation (``obj`` without status) and typed, lenient views of it."""

    obj: Mapping[str, Any]
    lf: LfTable
    policy: Policy = OFFLINE
    job: FineTuneJob = field(init=False)

    def __post_init__(self) -> None:
        self.job = lenient.parse(FineTuneJob, self.obj)

    @property
    def metadata(self) -> ObjectMeta:
        return self.job.metadata if self.job.metadata is not None else lenient.parse(ObjectMeta, {})

    @property
    def spec(self) -> FineTuneJobSpec:
        return self.job.spec if self.job.spec is not None else lenient.parse(FineTuneJobSpec, {})

    def stages(self) -> list[tuple[int, StageSpec]]:
        """``(index on the wire, stage)`` for every stage that is a mapping."""
        return [(i, s) for i, s in enumerate(self.spec.stages or []) if s is not None]

    def datasets(self) -> list[tuple[int, DatasetSpec]]:
        return [(i, d) for i, d in enumerate(self.spec.datasets or []) if d is not None]

    def datasets_by_name(self) -> dict[str, DatasetSpec]:
        out: dict[str, DatasetSpec] = {}
        for _, ds in self.datasets():
            if ds.name is not None:
                out.setdefault(ds.name, ds)
        return out

    def chain(self) -> tuple[walker.Walk, list[int]]:
        """The adapter walk over the stages, and the wire index of each walked stage."""
        pairs = self.stages()
        merge = self.spec.merge
        return walker.walk([s for _, s in pairs], merge.stage if merge is not None else None), [i for i, _ in pairs]
