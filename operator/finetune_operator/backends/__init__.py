"""Training backends: one module per workload kind, one registry everything else reads.

==============  ==========================================  =======================================================
``backend``     workload                                    module
==============  ==========================================  =======================================================
``job``         batch/v1 Job (Indexed + headless Service)   :mod:`.job`
``pytorchjob``  kubeflow.org/v1 PyTorchJob                  :mod:`.pytorchjob`
``deepspeedjob`` batch.tensorstack.dev/v1beta1 DeepSpeedJob :mod:`.deepspeedjob`
``trainjob``    trainer.kubeflow.org/v1alpha1 TrainJob      :mod:`.trainjob`
==============  ==========================================  =======================================================

:data:`REGISTRY` is the one list of backends. The API's ``Backend`` Literal (and so the CRD's enum and the
docs) must name exactly these (checked at import below, so a forgotten spelling fails every test at once); the
renderer, the operator's REST plurals and watches, the RBAC rules in the chart, the worker's environment mapping
and the tests' workload players all iterate the registry. Adding a backend: a module implementing
:class:`~.base.Backend`, its name in ``REGISTRY`` and in ``api.types.Backend``, a vendored upstream schema in
tests/fixtures/crds, and its tests (docs/backends.md walks through it).
"""

from __future__ import annotations

from typing import Final, get_args

from finetune_operator.api.types import Backend as BackendName
from finetune_operator.backends import deepspeedjob, job, pytorchjob, trainjob
from finetune_operator.backends.base import Backend, ChildStatus, Phase, Rule, StageInput

REGISTRY: Final[dict[str, Backend]] = {
    b.name: b for b in (job.BACKEND, pytorchjob.BACKEND, deepspeedjob.BACKEND, trainjob.BACKEND)
}

if set(get_args(BackendName)) != set(REGISTRY):  # pragma: no cover - a development-time mistake
    raise RuntimeError(
        f"api.types.Backend {sorted(get_args(BackendName))} and the backend registry {sorted(REGISTRY)} differ"
    )

_BY_KIND: Final[dict[str, Backend]] = {b.kind: b for b in REGISTRY.values()}


def get(name: str) -> Backend:
    """The backend called ``name`` (KeyError naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r} (known: {', '.join(REGISTRY)})") from None


def by_kind(kind: str) -> Backend | None:
    """The backend whose workload kind is ``kind`` (None for kinds that are no backend's, e.g. Deployment)."""
    return _BY_KIND.get(kind)


def names() -> tuple[str, ...]:
    """The backend names in registry order."""
    return tuple(REGISTRY)


__all__ = ["REGISTRY", "Backend", "ChildStatus", "Phase", "Rule", "StageInput", "by_kind", "get", "names"]
