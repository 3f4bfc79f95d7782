"""The evaluation, publish and answer workers' results, read from their pods' termination messages. Pure functions.

Why the termination message: ``ftctl worker eval`` and ``ftctl worker publish`` write one JSON line there on
success (``{"metrics": {...}}``, ``{"published": [...]}``). The kubelet copies it into the pod's
``status.containerStatuses[].state.terminated.message``; only the container itself writes that file, and
worker pods have no RBAC on pods, so no other pod (and no worker patching ``status.reported`` of the
FineTuneJob) can forge it. ``status`` of the FineTuneJob, which workers may patch, is never read back as a
result.

The answer Job (``ftctl worker answer``, serving with an API key) writes its verdict there the same way
(:func:`answer_verdict`; an ``ok`` counts only from a container that exited 0).

It is still worker output: it is treated as data. A message longer than the kubelet's limit, not JSON, or not
an object yields nothing; inside it only known keys with the right types within bounds are kept (metric names
of a safe alphabet, finite numbers; published copies only for destinations of the spec, with their spec's
type). The only decision taken from it is the gate's comparison of one number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from finetune_operator.api.types import PublishedCopy
from finetune_operator.chatcheck import Answer, parse_verdict

#: The kubelet keeps at most 4096 bytes of a termination message.
MAX_MESSAGE: Final = 4096
MAX_METRICS: Final = 64
MAX_PUBLISHED: Final = 16
METRIC_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")
#: Metric values beyond this are not measurements.
METRIC_BOUND: Final = 1e30
_MAX_URL: Final = 1024
_MAX_DIGEST: Final = 256


@dataclass(frozen=True)
class WorkerResult:
    """What one finished worker pod reported (empty when it reported nothing usable)."""

    metrics: dict[str, float] = field(default_factory=dict)
    published: list[PublishedCopy] = field(default_factory=list)


def job_pod_selector(job_name: str) -> str:
    """The label selector of a batch/v1 Job's pods (set by the Job controller, Kubernetes 1.27+)."""
    return f"batch.kubernetes.io/job-name={job_name}"


def _owned_by(pod: Mapping[str, Any], job_uid: str) -> bool:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller") and ref.get("uid") == job_uid:
            return True
    return False


def termination_message(pods: Iterable[Mapping[str, Any]], job_uid: str) -> str | None:
    """The termination message of the Job's latest container that exited 0 (pods the Job controls only)."""
    best: tuple[str, str] | None = None
    for pod in pods:
        if not _owned_by(pod, job_uid):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = ((cs or {}).get("state") or {}).get("terminated") or {}
            message = term.get("message")
            if term.get("exitCode") != 0 or not isinstance(message, str):
                continue
            finished = str(term.get("finishedAt") or "")
            if best is None or finished >= best[0]:
                best = (finished, message)
    return best[1] if best is not None else None


def answer_verdict(pods: Iterable[Mapping[str, Any]], job_uid: str) -> Answer | None:
    """The verdict of an answer Job's latest finished container (pods the Job controls only; ``ok`` only from
    exit code 0: see :func:`finetune_operator.chatcheck.parse_verdict`); None when none finished with one."""
    best: tuple[str, Answer] | None = None
    for pod in pods:
        if not _owned_by(pod, job_uid):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = ((cs or {}).get("state") or {}).get("terminated") or {}
            code = term.get("exitCode")
            message = term.get("message")
            if not isinstance(code, int) or not isinstance(message, str):
                continue
            verdict = parse_verdict(message, code)
            finished = str(term.get("finishedAt") or "")
            if verdict is not None and (best is None or finished >= best[0]):
                best = (finished, verdict)
    return best[1] if best is not None else None


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, float] = {}
    for key, value in raw.items():
        if len(out) >= MAX_METRICS:
            break
        if not isinstance(key, str) or not METRIC_NAME.match(key):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = float(value)
        if math.isfinite(number) and abs(number) <= METRIC_BOUND:
            out[key] = number
    return out


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str) or not value or len(value) > limit:
        return None
    if not value.isprintable() or any(ch.isspace() for ch in value):
        return None
    return value


def _published(raw: Any, destinations: Mapping[str, str]) -> list[PublishedCopy]:
    """Copies for destinations of the spec (name -> type) only, once each, in the worker's order."""
    if not isinstance(raw, list):
        return []
    out: list[PublishedCopy] = []
    seen: set[str] = set()
    for item in raw[:MAX_PUBLISHED]:
        if not isinstance(item, Mapping):
            continue
        name, type_ = item.get("name"), item.get("type")
        url = _text(item.get("url"), _MAX_URL)
        if not isinstance(name, str) or destinations.get(name) != type_ or name in seen or url is None:
            continue
        digest = _text(item.get("digest"), _MAX_DIGEST) if item.get("digest") is not None else None
        seen.add(name)
        out.append(PublishedCopy(name=name, type=str(type_), url=url, digest=digest))
    return out


def parse(message: str | None, destinations: Mapping[str, str] | None = None) -> WorkerResult | None:
    """A worker's termination message as a :class:`WorkerResult`; None when it is absent or not a result."""
    if message is None or len(message.encode("utf-8", "replace")) > MAX_MESSAGE:
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    if not isinstance(data, Mapping):
        return None
    return WorkerResult(_metrics(data.get("metrics")), _published(data.get("published"), destinations or {}))


def metric_column(metrics: Mapping[str, float], preferred: str | None = None) -> str | None:
    """``eval_loss=1.234`` for ``kubectl get``: the gated metric, else the first by name."""
    if not metrics:
        return None
    name = preferred if preferred in metrics else sorted(metrics)[0]
    assert name is not None
    return f"{name}={metrics[name]:.4g}"
