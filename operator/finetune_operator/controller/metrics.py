"""Prometheus metrics of the operator (served on ``--metrics-port`` at ``/metrics``).

Defined once at import on the default registry, the way prometheus-client expects; the names follow
Prometheus conventions (``_total`` counters, ``_seconds`` histograms, a common ``finetune_`` prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

JOBS = Gauge("finetune_jobs", "FineTuneJobs known to the operator, by status.state", ["state"])
STAGE_DURATION = Histogram(
    "finetune_stage_duration_seconds",
    "Wall time of succeeded stages, from the first workload's creation to success",
    ["type"],
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200),
)
RECONCILES = Counter("finetune_reconciles_total", "Reconciles run")
RECONCILE_ERRORS = Counter("finetune_reconcile_errors_total", "Reconciles that raised (retried with backoff)")
STATUS_CONFLICTS = Counter("finetune_status_conflicts_total", "Status writes refused for a stale resourceVersion")
API_REQUESTS = Counter(
    "finetune_api_requests_total", "Kubernetes API requests by verb and status code", ["verb", "code"]
)
API_RETRIES = Counter(
    "finetune_api_retries_total", "Kubernetes API requests retried after 429/5xx/connection errors", ["verb"]
)
CHILDREN_CREATED = Counter("finetune_children_created_total", "Child objects created, by kind", ["kind"])
QUEUE_DEPTH = Gauge("finetune_reconcile_queue_depth", "FineTuneJobs waiting for or being reconciled")


def set_job_states(states: Mapping[Any, str]) -> None:
    """Refresh the ``finetune_jobs`` gauge from ``{job key: state}``."""
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    for state in ("Pending", "Running", "Suspended", "Serving", "Succeeded", "Failed"):
        JOBS.labels(state=state).set(counts.get(state, 0))
