"""``ftctl worker stop``: a preStop hook that checkpoints the trainers of a pod whose PID 1 is not the worker.

Why: the kubelet sends SIGTERM to a container's PID 1 only, and when PID 1 exits every other process of the
container is killed at once. Under T9k's DeepSpeedJob, PID 1 of a worker pod is ``sshd``; DeepSpeed's launcher
starts our ``ftctl worker train`` processes through SSH sessions, so on preemption sshd exits and the trainers
die without the checkpoint that :mod:`.preempt` would make. A ``preStop`` hook runs *before* that SIGTERM and
the kubelet waits for it (within ``terminationGracePeriodSeconds``): it sends SIGTERM to every training worker
of the container, which then asks its trainer to save at the next step boundary (all ranks agree on the step),
and waits until they have exited.

The workers announce themselves in a pod-local folder (``/tmp`` is the pod's emptyDir; ``FT_RUNNING_DIR``
overrides it): one file per process, named by its PID, removed when it ends. A PID is signalled only while its
command line is still an ``ftctl worker train`` (a stale file of a recycled PID is ignored), and exits are
awaited through pidfds, not by polling.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from finetune_operator.worker import preempt

log = logging.getLogger("finetune_operator.worker.stopping")

RUNNING_DIR_ENV = "FT_RUNNING_DIR"
DEFAULT_RUNNING_DIR = "/tmp/finetune-running"


def running_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(RUNNING_DIR_ENV) or DEFAULT_RUNNING_DIR)


@contextlib.contextmanager
def announced(environ: Mapping[str, str]) -> Iterator[None]:
    """Announce this process as a training worker for the duration of the block."""
    folder = running_dir(environ)
    entry = folder / str(os.getpid())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entry.write_text("train\n", encoding="utf-8")
    except OSError as exc:  # no writable /tmp: training still runs, only the preStop hook cannot find it
        log.warning("cannot announce the training worker in %s (%s): a preStop stop will not reach it", folder, exc)
        yield
        return
    try:
        yield
    finally:
        entry.unlink(missing_ok=True)


def _is_training_worker(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and b"train" in argv


def stop_running(environ: Mapping[str, str], deadline: float | None = None) -> int:
    """SIGTERM every announced training worker, wait until they exit or ``deadline`` seconds pass (the pod's
    grace period less a margin, :func:`preempt.stop_deadline`). Returns how many are still running."""
    folder = running_dir(environ)
    limit = time.monotonic() + (preempt.stop_deadline(environ) if deadline is None else deadline)
    fds: dict[int, int] = {}
    for entry in sorted(folder.glob("[0-9]*")) if folder.is_dir() else []:
        pid = int(entry.name)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            entry.unlink(missing_ok=True)  # gone
            continue
        if not _is_training_worker(pid):
            os.close(fd)
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except OSError:
            os.close(fd)
            continue
        log.info("asked training worker %d to checkpoint and stop", pid)
        fds[fd] = pid
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while fds:
        left = limit - time.monotonic()
        if left <= 0:
            break
        for fd, _event in poller.poll(left * 1000):
            poller.unregister(fd)
            log.info("training worker %d has stopped", fds.pop(fd))
            os.close(fd)
    for fd, pid in fds.items():
        log.warning("training worker %d did not stop within the grace period", pid)
        os.close(fd)
    return len(fds)
