"""From a pod's distributed environment to LLaMA-Factory's launcher variables: the part every backend shares.

LLaMA-Factory starts ``torchrun`` itself when ``FORCE_TORCHRUN`` is set, from ``NNODES``, ``NODE_RANK``,
``NPROC_PER_NODE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Every workload kind describes the same facts under other
names, and wiring them by hand is where users get hangs (a wrong node rank or world size makes torchrun wait for
peers that never come). Each backend module reads its own variables into a :class:`Topology`;
:func:`torchrun_launch` turns any topology into a :class:`Launch`. Pure: environment in, environment out, so
every backend is covered by table-driven tests (tests/test_worker_envmap.py).

Common variables: ``FT_NPROC_PER_NODE`` (processes per node; the renderer sets the GPU count), ``FT_MASTER_PORT``
(overrides the port; default 29500 on multi-node), ``FT_HOST_ALIASES`` (``name=address,...``: resolves the
master's name like a pod's ``hostAliases`` would, which is how tests run two "nodes" on one machine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from finetune_operator.errors import WorkerError

#: single: one process, no torchrun; torchrun: LLaMA-Factory launches torchrun; direct: an outer launcher
#: (DeepSpeed's) already started this process as one rank.
LaunchMode = Literal["single", "torchrun", "direct"]

DEFAULT_MASTER_PORT = 29500

#: Variables the mapping sets for LLaMA-Factory's launcher (and removes where they would mislead it).
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


@dataclass(frozen=True)
class Topology:
    """What a node's environment says about the job: nodes, this node's rank, processes, rendezvous."""

    nnodes: int = 1
    node_rank: int = 0
    #: None: not given by the backend (``FT_NPROC_PER_NODE``, else 1).
    nproc_per_node: int | None = None
    master_addr: str | None = None
    master_port: int | None = None


def env_int(environ: Mapping[str, str], name: str, default: int | None = None, *, minimum: int = 0) -> int:
    """An integer variable; a clear :class:`DistributedEnvError` when missing (without default) or malformed."""
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


def env_nproc(environ: Mapping[str, str], name: str = "FT_NPROC_PER_NODE") -> int | None:
    """A process count; ``None`` when unset or symbolic (torchrun accepts ``auto``/``gpu`` in PET_NPROC_PER_NODE)."""
    raw = environ.get(name, "")
    if raw in ("", "auto", "gpu", "cpu"):
        return None
    return env_int(environ, name, minimum=1)


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


def resolve(addr: str, environ: Mapping[str, str]) -> str:
    """``addr`` through ``FT_HOST_ALIASES``."""
    return host_aliases(environ).get(addr, addr)


def torchrun_topology(environ: Mapping[str, str], prefix: str = "PET_") -> Topology:
    """torchrun's own environment defaults (``PET_NNODES`` ...), which Kubeflow's PyTorchJob and Trainer v2's
    torch plugin both set; ``PET_NNODES`` may be elastic ``min:max`` (the maximum is the fixed size)."""
    nnodes = env_int({"N": environ[f"{prefix}NNODES"].split(":")[-1]}, "N", minimum=1)
    node_rank = env_int(environ, f"{prefix}NODE_RANK", env_int(environ, "RANK", 0))
    port_raw = environ.get(f"{prefix}MASTER_PORT") or environ.get("MASTER_PORT")
    return Topology(
        nnodes=nnodes,
        node_rank=node_rank,
        nproc_per_node=env_nproc(environ, f"{prefix}NPROC_PER_NODE"),
        master_addr=environ.get(f"{prefix}MASTER_ADDR") or environ.get("MASTER_ADDR"),
        master_port=env_int({f"{prefix}MASTER_PORT": port_raw}, f"{prefix}MASTER_PORT", minimum=1)
        if port_raw
        else None,
    )


def torchrun_launch(
    backend: str, topo: Topology, environ: Mapping[str, str], *, force_torchrun: bool = False
) -> Launch:
    """A :class:`Launch` for ``topo``: one plain process when nothing is distributed, else LLaMA-Factory's
    torchrun with the launcher variables. ``force_torchrun``: the stage needs a distributed launch even with
    one process (DeepSpeed)."""
    nproc = topo.nproc_per_node or env_nproc(environ) or 1
    nnodes, node_rank = topo.nnodes, topo.node_rank
    if node_rank >= nnodes:
        raise DistributedEnvError(f"node rank {node_rank} is not below the number of nodes {nnodes}")
    if nnodes > 1 and not topo.master_addr:
        raise DistributedEnvError(f"{backend}: {nnodes} nodes but no master address in the environment")
    master_port = topo.master_port
    if environ.get("FT_MASTER_PORT"):
        master_port = env_int(environ, "FT_MASTER_PORT", minimum=1)

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
    env: dict[str, str | None] = {
        "FORCE_TORCHRUN": "1",
        "NNODES": str(nnodes),
        "NODE_RANK": str(node_rank),
        "NPROC_PER_NODE": str(nproc),
    }
    if topo.master_addr:
        env["MASTER_ADDR"] = resolve(topo.master_addr, environ)
    if master_port is not None:
        env["MASTER_PORT"] = str(master_port)
    elif nnodes > 1:
        env["MASTER_PORT"] = str(DEFAULT_MASTER_PORT)
    return Launch(
        mode="torchrun", nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc, primary=node_rank == 0, env=env
    )
