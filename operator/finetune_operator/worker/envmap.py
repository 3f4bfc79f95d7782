"""Map each backend's distributed environment to LLaMA-Factory's launcher variables.

The worker learns its backend from ``FT_BACKEND`` (set by the renderer) and asks that backend's module
(:mod:`finetune_operator.backends`) how the pod's environment maps to ``NNODES``, ``NODE_RANK``,
``NPROC_PER_NODE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the shared machinery is
:mod:`finetune_operator.backends.launch`). Each backend documents its variables in its module:

* ``job``: ``JOB_COMPLETION_INDEX`` + ``FT_NNODES`` + the headless Service of an Indexed Job;
* ``pytorchjob``: the training operator's ``PET_*`` (and ``WORLD_SIZE``/``RANK`` of older releases);
* ``deepspeedjob``: DeepSpeed's launcher already started this process as one rank (mode ``direct``);
* ``trainjob``: Trainer v2's torch plugin's ``PET_*``.

``local`` (``ftctl run --local``) is no workload kind: one machine, ``FT_NPROC_PER_NODE`` processes.
"""

from __future__ import annotations

from collections.abc import Mapping

from finetune_operator import backends
from finetune_operator.backends.launch import (
    DEFAULT_MASTER_PORT,
    LAUNCHER_VARS,
    DistributedEnvError,
    Launch,
    LaunchMode,
    Topology,
    host_aliases,
    torchrun_launch,
)

LOCAL = "local"
#: Every value ``FT_BACKEND``/``--backend`` may take.
BACKENDS: tuple[str, ...] = (*backends.names(), LOCAL)

__all__ = [
    "BACKENDS",
    "DEFAULT_MASTER_PORT",
    "LAUNCHER_VARS",
    "DistributedEnvError",
    "Launch",
    "LaunchMode",
    "apply_env",
    "host_aliases",
    "map_env",
    "plan_launch",
]


def plan_launch(backend: str, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
    """Work out how to launch on this node. ``force_torchrun``: the stage needs a distributed launch even with one
    process (DeepSpeed)."""
    if backend == LOCAL:
        return torchrun_launch(LOCAL, Topology(), environ, force_torchrun=force_torchrun)
    if backend not in backends.REGISTRY:
        raise DistributedEnvError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    return backends.get(backend).plan_launch(environ, force_torchrun=force_torchrun)


def map_env(backend: str, environ: Mapping[str, str], *, force_torchrun: bool = False) -> dict[str, str | None]:
    """The launcher variables for ``backend`` (``None``: remove the variable). See :func:`plan_launch`."""
    return dict(plan_launch(backend, environ, force_torchrun=force_torchrun).env)


def apply_env(base: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """``base`` with ``changes`` applied (``None`` removes a variable)."""
    out = dict(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out
