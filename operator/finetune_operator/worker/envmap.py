"""Map each backend's distributed environment to LLaMA-Factory's launcher variables.

LLaMA-Factory starts ``torchrun`` itself when ``FORCE_TORCHRUN`` is set, from ``NNODES``, ``NODE_RANK``,
``NPROC_PER_NODE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Every workload kind describes the same facts under other
names, and wiring them by hand is where users get hangs (a wrong node rank or world size makes torchrun wait for
peers that never come). This module is the one place that does the translation; it is pure (environment in,
environment out) so every backend is covered by table-driven tests.

Backends:

``pytorchjob`` (Kubeflow training-operator v1)
    Pods get ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``/``PORT`` (torchrun's own
    environment defaults) and ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``. The ``PET_*`` values are
    authoritative. Without them (older operators) ``WORLD_SIZE`` counts pods and ``RANK`` is the pod's index.
``deepspeedjob`` (T9k ``DeepspeedJob``)
    The ``deepspeed`` launcher on the first replica starts one process per slot on every replica (over pdsh) with
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` already set: the worker must not
    start torchrun again, it runs LLaMA-Factory's training entry point directly (mode ``direct``).
``job`` (batch/v1, Indexed when a stage has several nodes)
    ``JOB_COMPLETION_INDEX`` is the node rank; ``FT_NNODES`` the number of nodes; the master is pod 0 behind the
    headless Service: ``<job name>-0.<FT_HEADLESS_SERVICE>`` (the Job name from ``FT_WORKLOAD_NAME``, else from the
    pod's ``HOSTNAME`` ``<job name>-<index>``). ``FT_MASTER_ADDR`` overrides the address.
``local`` (``ftctl run --local``)
    One machine: ``FT_NPROC_PER_NODE`` processes.

Common: ``FT_NPROC_PER_NODE`` (processes per node; the renderer sets the GPU count), ``FT_MASTER_PORT`` (default
29500 on multi-node), ``FT_HOST_ALIASES`` (``name=address,...``: resolves the master's name like a pod's
``hostAliases`` would, which is how tests run two "nodes" on one machine).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from finetune_operator.errors import WorkerError

Backend = Literal["job", "pytorchjob", "deepspeedjob", "local"]
BACKENDS: tuple[str, ...] = ("job", "pytorchjob", "deepspeedjob", "local")
#: single: one process, no torchrun; torchrun: LLaMA-Factory launches torchrun; direct: an outer launcher
#: (DeepSpeed's) already started this process as one rank.
LaunchMode = Literal["single", "torchrun", "direct"]

DEFAULT_MASTER_PORT = 29500

#: Variables this module sets for LLaMA-Factory's launcher (and removes where they would mislead it).
LAUNCHER_VARS = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "FORCE_TORCHRUN")


class DistributedEnvError(WorkerError):
    """The pod's distributed environment is incomplete or inconsistent (a rendering or operator bug)."""

    exit_code = 8


@dataclass(frozen=True)
class Launch:
    """How to start LLaMA-Factory on this node."""

    mode: LaunchMode
    nnodes: int
    node_rank: int
    nproc_per_node: int
    #: Global rank 0 lives in this process tree: it alone writes completion markers and progress.
    primary: bool
    #: Variables to set in the child's environment (values) or remove from it (``None``).
    env: dict[str, str | None] = field(default_factory=dict)


def _int(environ: Mapping[str, str], name: str, default: int | None = None, *, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistributedEnvError(f"environment variable {name} is required here but not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DistributedEnvError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedEnvError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _nproc(environ: Mapping[str, str], name: str = "FT_NPROC_PER_NODE") -> int | None:
    """A process count; ``None`` when unset or symbolic (torchrun accepts ``auto``/``gpu`` in PET_NPROC_PER_NODE)."""
    raw = environ.get(name, "")
    if raw in ("", "auto", "gpu", "cpu"):
        return None
    return _int(environ, name, minimum=1)


def host_aliases(environ: Mapping[str, str]) -> dict[str, str]:
    """``FT_HOST_ALIASES`` (``name=address,name2=address2``) as a dict."""
    out: dict[str, str] = {}
    for item in environ.get("FT_HOST_ALIASES", "").split(","):
        if not item.strip():
            continue
        name, sep, addr = item.partition("=")
        if not sep or not name.strip() or not addr.strip():
            raise DistributedEnvError(f"FT_HOST_ALIASES entry {item!r} is not name=address")
        out[name.strip()] = addr.strip()
    return out


def _resolve(addr: str, environ: Mapping[str, str]) -> str:
    return host_aliases(environ).get(addr, addr)


def _indexed_job_master(environ: Mapping[str, str]) -> str:
    explicit = environ.get("FT_MASTER_ADDR")
    if explicit:
        return explicit
    service = environ.get("FT_HEADLESS_SERVICE")
    if not service:
        raise DistributedEnvError("a multi-node Indexed Job needs FT_HEADLESS_SERVICE (or FT_MASTER_ADDR)")
    workload = environ.get("FT_WORKLOAD_NAME")
    if not workload:
        # Pods of an Indexed Job with a subdomain are named <job>-<index> in DNS and in HOSTNAME.
        host = environ.get("HOSTNAME", "")
        m = re.fullmatch(r"(.+)-(\d+)", host)
        if not m:
            raise DistributedEnvError(
                "cannot derive the Job name: set FT_WORKLOAD_NAME (HOSTNAME is not <job>-<index>)"
            )
        workload = m.group(1)
    return f"{workload}-0.{service}"


def plan_launch(backend: str, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
    """Work out how to launch on this node. ``force_torchrun``: the stage needs a distributed launch even with one
    process (DeepSpeed)."""
    if backend not in BACKENDS:
        raise DistributedEnvError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")

    if backend == "deepspeedjob" and "RANK" in environ and "WORLD_SIZE" in environ:
        rank = _int(environ, "RANK")
        world = _int(environ, "WORLD_SIZE", minimum=1)
        if rank >= world:
            raise DistributedEnvError(f"RANK={rank} is not below WORLD_SIZE={world}")
        local = _int(environ, "LOCAL_RANK", 0)
        local_size = _int(environ, "LOCAL_SIZE", 1, minimum=1)
        # Drop FORCE_TORCHRUN/NNODES/...: they would make a nested torchrun wait for peers that never come.
        env: dict[str, str | None] = {k: None for k in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "FORCE_TORCHRUN")}
        if "MASTER_ADDR" in environ:
            env["MASTER_ADDR"] = _resolve(environ["MASTER_ADDR"], environ)
        return Launch(
            mode="direct",
            nnodes=max(1, world // local_size),
            node_rank=_int(environ, "CROSS_RANK", (rank - local) // local_size),
            nproc_per_node=local_size,
            primary=rank == 0,
            env=env,
        )

    nproc = _nproc(environ) or 1
    nnodes, node_rank = 1, 0
    master_addr: str | None = None
    master_port: int | None = None
    if backend == "pytorchjob":
        nproc = _nproc(environ, "PET_NPROC_PER_NODE") or nproc
        if environ.get("PET_NNODES"):
            raw = environ["PET_NNODES"]
            # Elastic PyTorchJobs give "min:max"; a fixed-size job gives one number.
            nnodes = _int({"PET_NNODES": raw.split(":")[-1]}, "PET_NNODES", minimum=1)
            node_rank = _int(environ, "PET_NODE_RANK", _int(environ, "RANK", 0))
        elif environ.get("WORLD_SIZE"):
            nnodes = _int(environ, "WORLD_SIZE", minimum=1)
            node_rank = _int(environ, "RANK", 0)
        master_addr = environ.get("PET_MASTER_ADDR") or environ.get("MASTER_ADDR")
        port_raw = environ.get("PET_MASTER_PORT") or environ.get("MASTER_PORT")
        master_port = _int({"P": port_raw}, "P", minimum=1) if port_raw else None
    elif backend in ("job", "deepspeedjob"):
        # deepspeedjob without RANK: a single-replica job (no launcher environment); treat it like a Job pod.
        nnodes = _int(environ, "FT_NNODES", 1, minimum=1)
        if nnodes > 1:
            node_rank = _int(environ, "JOB_COMPLETION_INDEX")
            master_addr = _indexed_job_master(environ)
    else:  # local
        nnodes = 1

    if node_rank >= nnodes:
        raise DistributedEnvError(f"node rank {node_rank} is not below the number of nodes {nnodes}")
    if nnodes > 1 and not master_addr:
        raise DistributedEnvError(f"{backend}: {nnodes} nodes but no master address in the environment")
    if environ.get("FT_MASTER_PORT"):
        master_port = _int(environ, "FT_MASTER_PORT", minimum=1)

    distributed = nnodes > 1 or nproc > 1 or force_torchrun
    if not distributed:
        return Launch(
            mode="single",
            nnodes=1,
            node_rank=0,
            nproc_per_node=1,
            primary=True,
            env={k: None for k in LAUNCHER_VARS},
        )
    env = {
        "FORCE_TORCHRUN": "1",
        "NNODES": str(nnodes),
        "NODE_RANK": str(node_rank),
        "NPROC_PER_NODE": str(nproc),
    }
    if master_addr:
        env["MASTER_ADDR"] = _resolve(master_addr, environ)
    if master_port is not None:
        env["MASTER_PORT"] = str(master_port)
    elif nnodes > 1:
        env["MASTER_PORT"] = str(DEFAULT_MASTER_PORT)
    return Launch(
        mode="torchrun", nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc, primary=node_rank == 0, env=env
    )


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
