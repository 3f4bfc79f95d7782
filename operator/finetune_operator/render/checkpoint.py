"""What a stage's ``checkpoint`` block renders into its training pods.

The worker reads these variables (:mod:`finetune_operator.worker.preempt`); nothing is rendered for a stage
without the block, so existing specs render unchanged (the worker's defaults match: checkpoint on preemption,
a 60-second grace period).
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.checkpointing import (
    CHECKPOINT_EVERY_ENV,
    DEFAULT_GRACE_SECONDS,
    GRACE_ENV,
    PREEMPTION_ENV,
    parse_duration,
)
from finetune_operator.api.types import StageSpec


def checkpoint_env(stage: StageSpec) -> list[dict[str, Any]]:
    """The ``FT_*`` variables of the stage's checkpoint settings (empty without a ``checkpoint`` block)."""
    ck = stage.checkpoint
    if ck is None:
        return []
    env: list[dict[str, Any]] = []
    if ck.every is not None:
        env.append({"name": CHECKPOINT_EVERY_ENV, "value": str(parse_duration(ck.every))})
    if not ck.on_preemption:
        env.append({"name": PREEMPTION_ENV, "value": "0"})
    if ck.termination_grace_period_seconds is not None:
        env.append({"name": GRACE_ENV, "value": str(ck.termination_grace_period_seconds)})
    return env


def grace_seconds(stage: StageSpec) -> int:
    """The training pods' terminationGracePeriodSeconds."""
    ck = stage.checkpoint
    if ck is None or ck.termination_grace_period_seconds is None:
        return DEFAULT_GRACE_SECONDS
    return ck.termination_grace_period_seconds
