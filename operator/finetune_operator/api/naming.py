"""Deterministic names for everything derived from a FineTuneJob.

Kubernetes limits Service names, label values and pod hostnames to 63 characters; Kubeflow users hit
``<name>-master-0`` / ``<name>-worker-12`` overflowing that (kubeflow/trainer #1745, #1101). So every derived
name goes through :func:`child_name`, which keeps names readable when they fit and otherwise cuts them and
appends a short hash of the full name. The hash makes the cut deterministic (the operator finds the same
child again after a restart) and collision-resistant (two long names that share a prefix stay distinct).
"""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
HASH_LEN = 8
#: Longest suffix a controller appends to our workload names to name its pods/services
#: (``-worker-`` + up to 4 digits for PyTorchJob/DeepSpeedJob, ``-<index>-<5 random>`` for Indexed Jobs).
POD_SUFFIX_RESERVE = len("-launcher-9999")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def is_dns_label(value: str) -> bool:
    """True for an RFC 1123 label: lowercase alphanumerics and '-', at most 63 characters."""
    return len(value) <= MAX_NAME and bool(_DNS_LABEL.match(value))


def short_hash(text: str, length: int = HASH_LEN) -> str:
    """A stable hex digest prefix (sha256), independent of Python's hash seed."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(*parts: str, reserve: int = 0) -> str:
    """Join ``parts`` with '-' into a DNS label of at most ``63 - reserve`` characters.

    ``reserve`` leaves room for suffixes that another controller appends (pod ordinals). When the joined
    name is too long it becomes ``<prefix>-<hash8>`` where the hash covers the full joined name.
    """
    full = "-".join(p for p in parts if p)
    limit = MAX_NAME - reserve
    if limit < HASH_LEN + 2:
        raise ValueError(f"reserve {reserve} leaves no room for a name")
    if len(full) <= limit:
        return full
    prefix = full[: limit - HASH_LEN - 1].rstrip("-")
    return f"{prefix}-{short_hash(full)}"


def run_scope(job: str, run_id: str | None) -> str:
    """The prefix of a run's children: ``<job>`` without a runId, else ``<job>-<runId>``.

    Workloads and generated configs belong to one run: a re-run (a new ``spec.runId``) gets fresh names, so
    it never collides with (or adopts) the previous run's finished workloads. Names stay DNS labels because
    :func:`child_name` truncates with a hash downstream.
    """
    return f"{job}-{run_id}" if run_id else job


def workload_name(job: str, stage: str) -> str:
    """Name of a stage's workload (Job, PyTorchJob, DeepSpeedJob, TrainJob), with room for pod suffixes."""
    return child_name(job, stage, reserve=POD_SUFFIX_RESERVE)


def config_map_name(job: str, stage: str | None = None) -> str:
    """Name of the ConfigMap holding the generated configs (of one stage, or shared ones)."""
    return child_name(job, stage or "", "config")


def service_name(job: str, stage: str) -> str:
    """Name of a Service (headless Service of an Indexed Job, or the vLLM Service)."""
    return child_name(job, stage)
