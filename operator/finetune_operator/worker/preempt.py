"""Checkpoint on preemption, and on a clock: the protocol between the worker and the trainer processes.

Why: a preempted pod gets SIGTERM and ``terminationGracePeriodSeconds`` before SIGKILL. Forwarding SIGTERM to
the trainer kills it and loses everything since the last ``save_steps`` checkpoint (hours on a large model with
the default 500 steps). Instead the worker asks the trainer to *save a checkpoint at the next step boundary and
exit*; the retried pod resumes from it (LLaMA-Factory's own resume), losing at most the step in flight.

Why a control folder and not a signal to the trainer: the kubelet signals only the container's PID 1 (the
worker). Under torchrun, a SIGTERM to the process group would also reach torchrun's agent, which tears its
workers down with a fixed 30-second limit, too short for a large checkpoint. A file the trainer polls at every
step end reaches every local rank without involving torchrun, costs one ``stat`` per step, and the ranks then
agree through one tiny all-reduce (all ranks must save the same step, or the collective save would hang).

Files in ``FT_CONTROL_DIR`` (a pod-local temporary folder the worker creates per run):

``training``
    written by the trainer when its training loop begins: before that there is nothing to save, and the
    worker forwards SIGTERM at once.
``stop``
    written by the worker when it receives SIGTERM/SIGINT: save at the next step boundary and exit.
``preempted.json``
    written by global rank 0 after the preemption checkpoint is complete: ``{"step": N}``.

Environment of the trainer: ``FT_CONTROL_DIR``, ``FT_CHECKPOINT_EVERY_SECONDS`` (time-based checkpoints, the
``checkpoint.every`` of a stage), ``FT_PREEMPTION_CHECKPOINT`` (``0`` disables the stop request).

This module is pure (no torch, no transformers): the trainer-side callback lives in :mod:`.lfentry`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api.checkpointing import (
    CHECKPOINT_EVERY_ENV,
    DEFAULT_GRACE_SECONDS,
    GRACE_ENV,
    GRACE_MARGIN_SECONDS,
    PREEMPTION_ENV,
    parse_duration,
)

__all__ = [
    "CHECKPOINT_EVERY_ENV",
    "DEFAULT_GRACE_SECONDS",
    "GRACE_ENV",
    "GRACE_MARGIN_SECONDS",
    "PREEMPTION_ENV",
    "parse_duration",
]

CONTROL_DIR_ENV = "FT_CONTROL_DIR"

TRAINING_FILE = "training"
STOP_FILE = "stop"
PREEMPTED_FILE = "preempted.json"

#: Exit code of a trainer that stopped after its preemption checkpoint (128 + SIGTERM, like a killed process).
PREEMPTED_EXIT_CODE = 143


def stop_deadline(environ: Mapping[str, str]) -> float:
    """Seconds the trainer gets to reach a step boundary and save, from the pod's grace period."""
    raw = environ.get(GRACE_ENV, "")
    try:
        grace = float(raw) if raw else float(DEFAULT_GRACE_SECONDS)
    except ValueError:
        grace = float(DEFAULT_GRACE_SECONDS)
    return max(grace - GRACE_MARGIN_SECONDS, 1.0)


def enabled(environ: Mapping[str, str]) -> bool:
    """Checkpoint on preemption unless ``FT_PREEMPTION_CHECKPOINT`` is ``0``/``false``."""
    return environ.get(PREEMPTION_ENV, "1").strip().lower() not in ("0", "false", "no")


@dataclass
class Control:
    """The worker's side of the control folder."""

    path: Path

    def training_started(self) -> bool:
        return (self.path / TRAINING_FILE).exists()

    def request_stop(self) -> None:
        (self.path / STOP_FILE).write_text(str(time.time()), encoding="utf-8")

    def preempted_step(self) -> int | None:
        """The step of the preemption checkpoint, or None when none was saved."""
        try:
            data = json.loads((self.path / PREEMPTED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        step = data.get("step") if isinstance(data, dict) else None
        return step if isinstance(step, int) else None


@dataclass
class Decision:
    """What the trainer does at one step boundary."""

    save: bool = False
    stop: bool = False


class Policy:
    """The trainer's side: decides at each step end whether to save (clock) or save-and-stop (preemption).

    ``agree`` combines the local flags across ranks (an all-reduce of the maximum in a distributed run; the
    identity otherwise), so that every rank saves the same step.
    """

    def __init__(
        self,
        control_dir: str | None,
        every_seconds: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        agree: Callable[[list[int]], list[int]] | None = None,
    ) -> None:
        self.control = Path(control_dir) if control_dir else None
        self.every = every_seconds if every_seconds and every_seconds > 0 else None
        self.clock = clock
        self.agree = agree or (lambda flags: flags)
        self.last_save = clock()
        self.signalled = False
        self.stopping = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **kwargs: Any) -> Policy:
        raw = environ.get(CHECKPOINT_EVERY_ENV, "")
        every = float(raw) if raw else None
        return cls(environ.get(CONTROL_DIR_ENV) or None, every, **kwargs)

    def training_begins(self, is_local_zero: bool) -> None:
        self.last_save = self.clock()
        if self.control is not None and is_local_zero:
            (self.control / TRAINING_FILE).write_text(str(os.getpid()), encoding="utf-8")

    def stop_requested(self) -> bool:
        return self.signalled or (self.control is not None and (self.control / STOP_FILE).exists())

    def step_end(self) -> Decision:
        due = self.every is not None and self.clock() - self.last_save >= self.every
        stop, due_all = self.agree([int(self.stop_requested()), int(due)])
        if stop:
            self.stopping = True
            return Decision(save=True, stop=True)
        return Decision(save=bool(due_all))

    def saved(self, step: int, is_world_zero: bool) -> bool:
        """After any checkpoint: restart the clock; True when the trainer must now exit (preemption)."""
        self.last_save = self.clock()
        if self.stopping and self.control is not None and is_world_zero:
            tmp = self.control / f".{PREEMPTED_FILE}.tmp"
            tmp.write_text(json.dumps({"step": step}), encoding="utf-8")
            tmp.replace(self.control / PREEMPTED_FILE)
        return self.stopping
