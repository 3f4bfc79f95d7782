"""Shared facts about checkpointing that the API, the renderer and the worker must agree on.

Kept apart from :mod:`.types` so that the worker (which must not depend on pydantic models to decide at run
time) and the renderer read the same duration syntax and the same default grace period.
"""

from __future__ import annotations

import re

#: ``terminationGracePeriodSeconds`` of every pod unless a stage sets ``checkpoint.terminationGracePeriodSeconds``.
DEFAULT_GRACE_SECONDS = 60
#: Seconds kept back from the grace period: after the trainer's save deadline the worker still has to stop
#: the process tree and exit before the kubelet's SIGKILL.
GRACE_MARGIN_SECONDS = 10
#: The shortest grace period a stage may ask for (the margin plus time to reach a step boundary).
MIN_GRACE_SECONDS = 30

#: Variables of training pods the worker reads (rendered only for a stage with a ``checkpoint`` block).
CHECKPOINT_EVERY_ENV = "FT_CHECKPOINT_EVERY_SECONDS"
PREEMPTION_ENV = "FT_PREEMPTION_CHECKPOINT"
GRACE_ENV = "FT_TERMINATION_GRACE_SECONDS"

#: ``90s``, ``30m``, ``1h30m``: hours, minutes, seconds, each optional, in that order (the CRD's pattern).
DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``1h30m`` -> seconds. Raises ValueError for anything else (or zero)."""
    m = _DURATION.fullmatch(text)
    if not text or m is None or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration like 90s, 30m or 1h30m")
    hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return total
