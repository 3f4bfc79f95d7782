"""Training progress: follow LLaMA-Factory's ``trainer_log.jsonl`` and report it.

LLaMA-Factory's log callback appends one JSON line per logging step (``current_steps``, ``total_steps``,
``loss``, ``epoch``, ``percentage``, ``remaining_time``) on the main process only. Following that file instead of
parsing stdout keeps the worker independent of log formats and works the same under torchrun and DeepSpeed.

Reports go to:

* the log, as one readable line per logged step (what ``kubectl logs`` shows);
* the FineTuneJob's ``status.reported.<stage>`` with a JSON merge PATCH of the ``status`` subresource, rate
  limited, from rank 0 only. The worker's ServiceAccount may patch ``finetunejobs/status`` and nothing else, and
  the request goes nowhere else. One PATCH with the pod's token through aiohttp, the HTTP library the operator
  uses too (no Kubernetes client library anywhere in the images). A failing report is logged and never stops
  training.

Environment: ``FT_JOB_NAME``, ``FT_JOB_NAMESPACE`` (which object), ``KUBERNETES_SERVICE_HOST``/``PORT`` and the
ServiceAccount files (the in-cluster API), overridable for tests and out-of-cluster use with ``FT_KUBE_API``
(base URL), ``FT_KUBE_TOKEN_FILE`` and ``FT_KUBE_CA_FILE``; ``FT_PROGRESS_INTERVAL`` (seconds between PATCHes,
default 15).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from finetune_operator.api import constants as c

log = logging.getLogger("finetune_operator.worker.progress")

TRAINER_LOG = "trainer_log.jsonl"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_INTERVAL = 15.0


@dataclass(frozen=True)
class Progress:
    """One progress report (the shape of ``status.reported.<stage>``)."""

    step: int
    total_steps: int | None = None
    loss: float | None = None
    epoch: float | None = None
    eta: str | None = None
    elapsed: str | None = None
    learning_rate: float | None = None

    @property
    def percent(self) -> float | None:
        if not self.total_steps:
            return None
        return round(100.0 * self.step / self.total_steps, 2)

    def to_status(self, now: datetime | None = None) -> dict[str, Any]:
        """camelCase dict for ``status.reported.<stage>`` (see :class:`~finetune_operator.api.types.StageProgress`)."""
        out: dict[str, Any] = {
            "step": self.step,
            "totalSteps": self.total_steps,
            "percent": self.percent,
            "loss": self.loss,
            "epoch": self.epoch,
            "eta": self.eta,
            "learningRate": self.learning_rate,
            "updateTime": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return out

    def line(self, stage: str) -> str:
        """A readable log line."""
        total = f"/{self.total_steps}" if self.total_steps else ""
        pct = f" ({self.percent:.0f}%)" if self.percent is not None else ""
        loss = f" loss={self.loss:.4f}" if self.loss is not None else ""
        epoch = f" epoch={self.epoch:.2f}" if self.epoch is not None else ""
        eta = f" eta={self.eta}" if self.eta else ""
        return f"[{stage}] step {self.step}{total}{pct}{loss}{epoch}{eta}"


def parse_record(record: Mapping[str, Any]) -> Progress | None:
    """A :class:`Progress` from one ``trainer_log.jsonl`` record (None for records without a step)."""
    step = record.get("current_steps")
    if not isinstance(step, int):
        return None
    total = record.get("total_steps")
    loss = record.get("loss")
    epoch = record.get("epoch")
    lr = record.get("lr")
    return Progress(
        step=step,
        total_steps=total if isinstance(total, int) else None,
        loss=float(loss) if isinstance(loss, (int, float)) else None,
        epoch=float(epoch) if isinstance(epoch, (int, float)) else None,
        eta=record.get("remaining_time") if isinstance(record.get("remaining_time"), str) else None,
        elapsed=record.get("elapsed_time") if isinstance(record.get("elapsed_time"), str) else None,
        learning_rate=float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None,
    )


class TrainerLogFollower:
    """Reads new complete lines of ``trainer_log.jsonl`` each time :meth:`poll` is called.

    Copes with the file not existing yet, a half-written last line (kept for the next poll) and the file being
    recreated (``overwrite_output_dir`` deletes it): a shorter file restarts from the beginning.

    A resumed run appends to the same file and logs again the steps since its checkpoint: those records are
    de-duplicated by step (a step below the last one reported is a replay), so progress never goes backwards
    and ``last`` is the record of the highest step, the loss the run ended with.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.last: Progress | None = None

    def poll(self) -> list[Progress]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self._offset:
            self._offset, self._partial = 0, b""
            self.last = None
        if size == self._offset:
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[Progress] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and (p := parse_record(record)) is not None:
                prev = out[-1] if out else self.last
                if prev is not None and p.step < prev.step:
                    continue  # a resumed run replaying the steps since its checkpoint
                if p.loss is None and prev is not None and prev.loss is not None:
                    # LLaMA-Factory's last record (end of training) has no loss: keep the latest one.
                    p = dataclasses.replace(p, loss=prev.loss)
                out.append(p)
        if out:
            self.last = out[-1]
        return out


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None


class StatusReporter:
    """PATCHes ``status.reported.<stage>`` of one FineTuneJob, at most once per ``interval`` seconds."""

    def __init__(
        self,
        api: str,
        namespace: str,
        name: str,
        stage: str,
        *,
        token_file: str | None = None,
        ca_file: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "finetune-worker",
    ) -> None:
        self.url = (
            f"{api.rstrip('/')}/apis/{c.GROUP}/{c.VERSION}/namespaces/{urllib.parse.quote(namespace)}/"
            f"{c.PLURAL}/{urllib.parse.quote(name)}/status"
        )
        self.stage = stage
        self.token_file = token_file
        self.interval = interval
        self._clock = clock
        self._last_sent: float | None = None
        self._pending: Progress | None = None
        self._disabled = False
        self._context: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            self._context = ssl.create_default_context(cafile=ca_file if ca_file and os.path.exists(ca_file) else None)
        self.sent = 0
        self.user_agent = user_agent

    @classmethod
    def from_env(cls, stage: str, environ: Mapping[str, str] | None = None) -> StatusReporter | None:
        """A reporter for this pod, or None when there is no job to report to or no API credentials."""
        env = os.environ if environ is None else environ
        name, namespace = env.get("FT_JOB_NAME"), env.get("FT_JOB_NAMESPACE")
        if not name or not namespace:
            return None
        api = env.get("FT_KUBE_API")
        if not api:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                return None
            host = f"[{host}]" if ":" in host else host
            api = f"https://{host}:{port}"
        token_file = env.get("FT_KUBE_TOKEN_FILE", f"{SA_DIR}/token")
        if _read(token_file) is None:
            log.info("no ServiceAccount token at %s: progress is only logged", token_file)
            return None
        interval = float(env.get("FT_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
        # Who reports shows in the API server's audit log: stage and pod.
        agent = f"finetune-worker ({stage}; {env.get('HOSTNAME', 'local')})"
        return cls(
            api,
            namespace,
            name,
            stage,
            token_file=token_file,
            ca_file=env.get("FT_KUBE_CA_FILE", f"{SA_DIR}/ca.crt"),
            interval=interval,
            user_agent=agent,
        )

    def report(self, progress: Progress, *, force: bool = False) -> bool:
        """Send ``progress`` unless one was sent less than ``interval`` ago (then keep it for :meth:`flush`)."""
        if self._disabled:
            return False
        now = self._clock()
        if not force and self._last_sent is not None and now - self._last_sent < self.interval:
            self._pending = progress
            return False
        self._pending = None
        self._last_sent = now
        return self._patch(progress)

    def flush(self) -> bool:
        """Send the report held back by the rate limit, if any."""
        if self._pending is None:
            return False
        pending, self._pending = self._pending, None
        return self.report(pending, force=True)

    def _patch(self, progress: Progress) -> bool:
        return self.patch_status({"reported": {self.stage: progress.to_status()}})

    def patch_status(self, fields: Mapping[str, Any]) -> bool:
        """One JSON merge PATCH of ``status`` with ``fields`` (the preflight pod's ``plan``; progress reports)."""
        if self._disabled:
            return False
        body = json.dumps({"status": dict(fields)}).encode()
        headers = {
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json",
            "User-Agent": self.user_agent,
        }
        token = _read(self.token_file) if self.token_file else None  # re-read: projected tokens rotate
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            status, reason = asyncio.run(self._send(body, headers))
        except (OSError, ValueError, TimeoutError, aiohttp.ClientError) as exc:
            log.warning("progress report to %s failed: %s", self.url, exc)
            return False
        if not 200 <= status < 300:
            if status in (401, 403, 404):
                # Not allowed or no such object: it will not get better; stop asking (and stop logging).
                self._disabled = True
            log.warning("progress report to %s failed: HTTP %s %s", self.url, status, reason)
            return False
        self.sent += 1
        return True

    async def _send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        # A session per report: reports are seconds apart, and this runs in the monitor's thread, which has no
        # event loop of its own between reports.
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.patch(self.url, data=body, headers=headers, ssl=self._context or True) as resp,
        ):
            await resp.read()
            return resp.status, str(resp.reason or "")


class ProgressMonitor:
    """A background thread that follows the trainer log and hands every new step to ``callbacks``."""

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        callbacks: list[Callable[[Progress], None]],
        *,
        poll_interval: float | None = None,
    ) -> None:
        self.follower = TrainerLogFollower(Path(output_dir) / TRAINER_LOG)
        self.callbacks = callbacks
        # FT_PROGRESS_POLL: how often the log is read (seconds); tests use a short one.
        self.poll_interval = (
            poll_interval if poll_interval is not None else float(os.environ.get("FT_PROGRESS_POLL", 1.0))
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _drain(self) -> None:
        for p in self.follower.poll():
            for cb in self.callbacks:
                try:
                    cb(p)
                except Exception:  # a broken reporter must not stop training
                    log.exception("progress callback failed")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self._drain()
