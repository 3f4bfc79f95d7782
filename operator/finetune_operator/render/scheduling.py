"""Where each pod goes: ``spec.scheduling`` (the job's defaults) merged with the step's own ``scheduling``.

Merging, per field: ``nodeSelector`` keys of the step override the job's; ``tolerations`` are the job's plus
the step's; ``affinity`` and ``priorityClassName`` of the step replace the job's; ``schedulerName`` is the
job's. The step is found from the pod's component (download, train + stage name, merge, serve), so every
workload builder gets it without knowing about it.

GPU placement is not inherited by pods without GPUs: a job-level ``nodeSelector`` key or toleration key that
names GPUs (``nvidia.com/…``, ``amd.com/…``, or containing ``gpu`` or ``accelerator``, such as
``cloud.google.com/gke-accelerator``) applies only to pods that request GPUs. Download and merge pods would
otherwise hold scarce GPU nodes while using none. A step's own settings always apply (they were asked for).
"""

from __future__ import annotations

import re
from typing import Any

from finetune_operator.api.types import FineTuneJob, StepScheduling, Toleration
from finetune_operator.render.meta import COMPONENT_DOWNLOAD, COMPONENT_MERGE, COMPONENT_SERVE, COMPONENT_TRAIN

_GPU_KEY = re.compile(r"^(nvidia\.com/|amd\.com/)|gpu|accelerator", re.IGNORECASE)


def is_gpu_key(key: str | None) -> bool:
    """A node label or taint key that places pods on GPU nodes."""
    return bool(key) and _GPU_KEY.search(key or "") is not None


def step_scheduling(job: FineTuneJob, component: str, stage: str) -> StepScheduling | None:
    """The step's own ``scheduling`` block, if any."""
    spec = job.spec
    if component == COMPONENT_TRAIN:
        return next((s.scheduling for s in spec.stages if s.name == stage), None)
    if component == COMPONENT_MERGE:
        return spec.merge.scheduling
    if component == COMPONENT_SERVE:
        return spec.serve.scheduling
    if component == COMPONENT_DOWNLOAD:
        return spec.model.download_scheduling
    return None


def _toleration(t: Toleration) -> dict[str, Any]:
    return t.model_dump(by_alias=True, exclude_none=True)


def pod_fields(job: FineTuneJob, component: str, stage: str, *, uses_gpu: bool) -> dict[str, Any]:
    """nodeSelector, tolerations, affinity, priorityClassName and schedulerName of one pod (see the module
    docstring)."""
    sched = job.spec.scheduling
    step = step_scheduling(job, component, stage)
    selector = {k: v for k, v in sched.node_selector.items() if uses_gpu or not is_gpu_key(k)}
    tolerations = [_toleration(t) for t in sched.tolerations if uses_gpu or not is_gpu_key(t.key)]
    affinity = sched.affinity
    priority = sched.priority_class_name
    if step is not None:
        selector.update(step.node_selector)
        tolerations += [_toleration(t) for t in step.tolerations if _toleration(t) not in tolerations]
        affinity = step.affinity or affinity
        priority = step.priority_class_name or priority
    out: dict[str, Any] = {}
    if selector:
        out["nodeSelector"] = selector
    if tolerations:
        out["tolerations"] = tolerations
    if affinity is not None:
        dumped = affinity.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
        if dumped:
            out["affinity"] = dumped
    if priority:
        out["priorityClassName"] = priority
    if sched.scheduler_name:
        out["schedulerName"] = sched.scheduler_name
    return out
