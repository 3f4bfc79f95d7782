"""The LLaMA-Factory child process: start it, forward signals, keep its output's tail, explain failures.

Why a child process and not an import: LLaMA-Factory's launcher starts torchrun (another process tree) for
distributed runs, and a training process that dies of OOM must not take the worker (and its marker/progress
logic) with it. Why forward signals to the whole process group: on preemption the kubelet sends SIGTERM to the
container's PID 1 (the worker) only; ``llamafactory-cli`` runs torchrun through ``subprocess.run`` and would be
killed without passing the signal on, leaving orphaned trainers writing to the volume. The child gets its own
session, and SIGTERM/SIGINT are sent to that whole group; the worker then exits ``128 + signal`` so the pod's
restart (or the Job's retry) resumes from the last checkpoint.

With a :class:`GracefulStop` (training), the first SIGTERM/SIGINT is not forwarded while the trainer can still
save: the worker asks it to checkpoint at the next step boundary (:mod:`.preempt`) and forwards the signal only
when the deadline passes (or at once, when training has not begun and there is nothing to save).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from finetune_operator.errors import DataError, ModelNotFoundError, OutOfMemoryError, TrainingError, WorkerError

TAIL_LINES = 200
#: Seconds between the forwarded SIGTERM and the SIGKILL of a child that overran its stop deadline.
KILL_AFTER_SECONDS = 5.0


@dataclass
class GracefulStop:
    """How to stop a child that can save its work first: ``request()`` asks it to (False: nothing to save, stop
    it now); the signal is forwarded when ``deadline`` seconds pass without the child exiting."""

    request: Callable[[], bool]
    deadline: float


@dataclass
class ChildResult:
    """How the child ended."""

    returncode: int
    tail: list[str] = field(default_factory=list)
    #: The signal the worker received and forwarded (None: it ended on its own).
    signal: int | None = None


def venv_bin() -> str:
    """The folder of this interpreter's console scripts (``torchrun``, ``llamafactory-cli``)."""
    return os.path.dirname(sys.executable)


def child_path(environ: Mapping[str, str]) -> str:
    """PATH with this environment's bin folder first: LLaMA-Factory runs ``torchrun`` by name."""
    path = environ.get("PATH", os.defpath)
    parts = [p for p in path.split(os.pathsep) if p]
    return os.pathsep.join([venv_bin(), *[p for p in parts if p != venv_bin()]])


def lf_command(subcommand: str, config: str, overrides: Sequence[str] = ()) -> list[str]:
    """``llamafactory-cli <subcommand> <config> key=value ...`` from this environment."""
    exe = os.path.join(venv_bin(), "llamafactory-cli")
    head = [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "llamafactory.cli"]
    return [*head, subcommand, config, *overrides]


def run_child(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    echo: IO[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    on_line: Callable[[str], None] | None = None,
    cwd: str | None = None,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
    graceful: GracefulStop | None = None,
) -> ChildResult:
    """Run ``argv`` in its own session; forward SIGTERM/SIGINT to its process group; return how it ended.

    Output (stdout and stderr merged) goes to ``echo`` (the worker's stdout in pods), to ``log_file`` and to
    ``on_line``; the last lines are kept for :func:`diagnose`.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    received: list[int] = []
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    if on_start is not None:
        on_start(proc)

    timers: list[threading.Timer] = []

    def kill_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def overran() -> None:
        kill_group(signal.SIGTERM)
        timers.append(threading.Timer(KILL_AFTER_SECONDS, kill_group, (signal.SIGKILL,)))
        timers[-1].daemon = True
        timers[-1].start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if graceful is not None and len(received) == 1 and graceful.request():
            timers.append(threading.Timer(graceful.deadline, overran))
            timers[-1].daemon = True
            timers[-1].start()
            return
        kill_group(signal.SIGTERM if signum == signal.SIGINT else signum)

    previous: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    log = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115 - closed below
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if echo is not None:
                echo.write(line)
                echo.flush()
            if log is not None:
                log.write(line)
                log.flush()
            if on_line is not None:
                on_line(line)
        returncode = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        for timer in timers:
            timer.cancel()
        if log is not None:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
    # Sweep: torchrun's workers may outlive a killed launcher.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return ChildResult(returncode=returncode, tail=list(tail), signal=received[0] if received else None)


_OOM = re.compile(
    r"CUDA out of memory|OutOfMemoryError|torch\.OutOfMemoryError|Cannot allocate memory|"
    r"DefaultCPUAllocator: can't allocate memory|std::bad_alloc|exitcode\s*:\s*-9|Signal 9 \(SIGKILL\)",
)
_DATA = re.compile(
    r"Undefined dataset|Cannot open data|File .* not found|Cannot find valid samples|"
    r"JSONDecodeError|ArrowInvalid|DatasetGenerationError|dataset_info\.json|Invalid dataset|"
    r"KeyError: '(?:messages|conversations|instruction|chosen|rejected)'",
)
_MODEL = re.compile(
    r"does not appear to have a file named config\.json|is not a local folder and is not a valid model identifier|"
    r"Can't load tokenizer|Incorrect path_or_model_id|No such file or directory: '.*(?:config|adapter_config)\.json'",
)


def diagnose(result: ChildResult, what: str) -> WorkerError:
    """A :class:`WorkerError` subclass with an actionable message, from the child's exit and output tail."""
    text = "\n".join(result.tail)
    last = _last_error_line(result.tail)
    if result.returncode in (-9, 137) or _OOM.search(text):
        return OutOfMemoryError(
            f"{what} ran out of memory ({last or 'killed'}): lower per_device_train_batch_size or cutoff_len, "
            "enable gradient_checkpointing, use DeepSpeed ZeRO-3/offload, or request more GPU memory"
        )
    if _MODEL.search(text):
        return ModelNotFoundError(f"{what}: the model or an adapter could not be loaded: {last}")
    if _DATA.search(text):
        return DataError(f"{what}: a dataset could not be read: {last} (check the file format and columns)")
    return TrainingError(f"{what} failed with exit code {result.returncode}: {last or 'see the log above'}")


def _last_error_line(tail: Sequence[str]) -> str:
    for line in reversed(tail):
        s = line.strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", s) or s.startswith("ValueError"):
            return s[:500]
    for line in reversed(tail):
        if line.strip():
            return line.strip()[:500]
    return ""


def check_file(path: str | os.PathLike[str], what: str) -> Path:
    """Raise :class:`DataError` unless ``path`` is a readable, non-empty file or folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what}: {p} does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{what}: {p} is empty")
    if not os.access(p, os.R_OK):
        raise DataError(f"{what}: {p} is not readable")
    return p
