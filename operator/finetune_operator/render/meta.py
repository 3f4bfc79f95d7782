"""Object metadata shared by every rendered object: names, namespace and the standard labels.

Every child carries the same label set so that the operator (and a human with ``kubectl get -l``) can find
all objects of one FineTuneJob, or of one of its stages, with a single selector. Owner references are *not*
set here: they need the FineTuneJob's uid, which only the operator knows (and GitOps renders must not carry).
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api import naming
from finetune_operator.api.naming import MAX_NAME, child_name
from finetune_operator.api.types import FineTuneJob

#: ``app.kubernetes.io/component`` values, one per kind of step (plus the shared configuration).
COMPONENT_CONFIG = "config"
COMPONENT_DOWNLOAD = "download"
COMPONENT_PREFLIGHT = "preflight"
COMPONENT_TRAIN = "train"
COMPONENT_MERGE = "merge"
COMPONENT_SERVE = "serve"


def label_value(value: str) -> str:
    """A label value of at most 63 characters, hash-truncated deterministically when longer."""
    return value if len(value) <= MAX_NAME else child_name(value)


def run_scope(job: FineTuneJob) -> str:
    """Name prefix of the current run's children (``<job>``, or ``<job>-<runId>``: see
    :func:`finetune_operator.api.naming.run_scope`). The vLLM Deployment and Service do not use it: they
    outlive a run and roll from one run's model to the next."""
    return naming.run_scope(job.name, job.spec.run_id)


def labels(job: FineTuneJob, component: str, stage: str) -> dict[str, str]:
    """The standard labels of a child object of ``job`` (and of its pod template)."""
    return {
        c.LABEL_NAME: c.APP_NAME,
        c.LABEL_INSTANCE: label_value(job.name),
        c.LABEL_COMPONENT: component,
        c.LABEL_MANAGED_BY: c.MANAGER,
        c.LABEL_JOB: label_value(job.name),
        c.LABEL_STAGE: label_value(stage),
    }


def selector_labels(job: FineTuneJob, component: str, stage: str) -> dict[str, str]:
    """The subset of :func:`labels` used in selectors (Services, Deployments): stable across upgrades."""
    full = labels(job, component, stage)
    return {k: full[k] for k in (c.LABEL_INSTANCE, c.LABEL_COMPONENT, c.LABEL_JOB, c.LABEL_STAGE)}


def metadata(job: FineTuneJob, name: str, component: str, stage: str, **extra_labels: str) -> dict[str, Any]:
    """``metadata`` of a namespaced child object."""
    lbl = labels(job, component, stage)
    lbl.update(extra_labels)
    return {"name": name, "namespace": job.namespace, "labels": lbl}
