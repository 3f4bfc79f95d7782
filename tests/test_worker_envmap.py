"""The distributed environment of every backend, mapped to LLaMA-Factory's launcher variables (table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.worker.envmap import DistributedEnvError, apply_env, map_env, plan_launch

# (id, backend, pod environment, force_torchrun, expected mode, primary, expected variables (None: removed))
CASES: list[tuple[str, str, dict[str, str], bool, str, bool, dict[str, Any]]] = [
    # Kubeflow Trainer v2, torch-distributed runtime: the torch plugin's PET_* (node rank = Job completion index,
    # master = <trainjob>-node-0-0.<trainjob>, port 29500); FT_NPROC_PER_NODE is overridden by PET_NPROC_PER_NODE.
    (
        "trainjob-rank0",
        "trainjob",
        {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "4",
            "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "tj-sft-node-0-0.tj-sft",
            "PET_MASTER_PORT": "29500",
            "FT_NPROC_PER_NODE": "1",
        },
        False,
        "torchrun",
        True,
        {
            "FORCE_TORCHRUN": "1",
            "NNODES": "2",
            "NODE_RANK": "0",
            "NPROC_PER_NODE": "4",
            "MASTER_ADDR": "tj-sft-node-0-0.tj-sft",
            "MASTER_PORT": "29500",
        },
    ),
    (
        "trainjob-rank1",
        "trainjob",
        {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": "1",
            "PET_MASTER_ADDR": "tj-sft-node-0-0.tj-sft",
            "PET_MASTER_PORT": "29500",
        },
        False,
        "torchrun",
        False,
        {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "1", "MASTER_PORT": "29500"},
    ),
    (
        "trainjob-one-node-one-process",
        "trainjob",
        {
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "tj-sft-node-0-0.tj-sft",
            "PET_MASTER_PORT": "29500",
        },
        False,
        "single",
        True,
        {"FORCE_TORCHRUN": None, "NNODES": None},
    ),
    (
        "trainjob-auto-nproc-falls-back",
        "trainjob",
        {
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": "auto",
            "PET_NODE_RANK": "0",
            "FT_NPROC_PER_NODE": "2",
            "PET_MASTER_ADDR": "m",
            "PET_MASTER_PORT": "29500",
        },
        False,
        "torchrun",
        True,
        {"NPROC_PER_NODE": "2"},
    ),
    (
        "job-single",
        "job",
        {"FT_NPROC_PER_NODE": "1"},
        False,
        "single",
        True,
        {"FORCE_TORCHRUN": None, "NNODES": None, "NPROC_PER_NODE": None},
    ),
    (
        "job-single-gpus",
        "job",
        {"FT_NPROC_PER_NODE": "8"},
        False,
        "torchrun",
        True,
        {"FORCE_TORCHRUN": "1", "NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "8"},
    ),
    (
        "job-single-deepspeed",
        "job",
        {},
        True,
        "torchrun",
        True,
        {"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "1"},
    ),
    (
        "stale-launcher-vars-removed",
        "job",
        {"FORCE_TORCHRUN": "1", "NNODES": "4"},
        False,
        "single",
        True,
        {"FORCE_TORCHRUN": None, "NNODES": None},
    ),
    (
        "indexed-job-rank0",
        "job",
        {
            "FT_NNODES": "2",
            "FT_NPROC_PER_NODE": "4",
            "JOB_COMPLETION_INDEX": "0",
            "FT_HEADLESS_SERVICE": "ft-sft",
            "FT_WORKLOAD_NAME": "ft-sft",
        },
        False,
        "torchrun",
        True,
        {
            "FORCE_TORCHRUN": "1",
            "NNODES": "2",
            "NODE_RANK": "0",
            "NPROC_PER_NODE": "4",
            "MASTER_ADDR": "ft-sft-0.ft-sft",
            "MASTER_PORT": "29500",
        },
    ),
    (
        "indexed-job-rank3-from-hostname",
        "job",
        {
            "FT_NNODES": "4",
            "JOB_COMPLETION_INDEX": "3",
            "FT_HEADLESS_SERVICE": "svc",
            "HOSTNAME": "my-job-sft-3",
            "FT_MASTER_PORT": "23456",
        },
        False,
        "torchrun",
        False,
        {
            "NNODES": "4",
            "NODE_RANK": "3",
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "my-job-sft-0.svc",
            "MASTER_PORT": "23456",
        },
    ),
    (
        "indexed-job-host-alias",
        "job",
        {
            "FT_NNODES": "2",
            "JOB_COMPLETION_INDEX": "1",
            "FT_HEADLESS_SERVICE": "svc",
            "FT_WORKLOAD_NAME": "wl",
            "FT_HOST_ALIASES": "wl-0.svc=127.0.0.1",
        },
        False,
        "torchrun",
        False,
        {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"},
    ),
    (
        "indexed-job-explicit-master",
        "job",
        {"FT_NNODES": "2", "JOB_COMPLETION_INDEX": "0", "FT_MASTER_ADDR": "10.0.0.7"},
        False,
        "torchrun",
        True,
        {"MASTER_ADDR": "10.0.0.7"},
    ),
    (
        "pytorchjob-master",
        "pytorchjob",
        {
            "MASTER_ADDR": "j-master-0",
            "MASTER_PORT": "23456",
            "WORLD_SIZE": "16",
            "RANK": "0",
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "8",
            "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "j-master-0",
            "PET_MASTER_PORT": "23456",
        },
        False,
        "torchrun",
        True,
        {
            "FORCE_TORCHRUN": "1",
            "NNODES": "2",
            "NODE_RANK": "0",
            "NPROC_PER_NODE": "8",
            "MASTER_ADDR": "j-master-0",
            "MASTER_PORT": "23456",
        },
    ),
    (
        "pytorchjob-worker-2",
        "pytorchjob",
        {
            "MASTER_ADDR": "j-master-0",
            "MASTER_PORT": "23456",
            "WORLD_SIZE": "3",
            "RANK": "2",
            "PET_NNODES": "3",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": "2",
        },
        False,
        "torchrun",
        False,
        {"NNODES": "3", "NODE_RANK": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "j-master-0"},
    ),
    (
        "pytorchjob-legacy-no-pet",
        "pytorchjob",
        {"MASTER_ADDR": "j-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1", "FT_NPROC_PER_NODE": "4"},
        False,
        "torchrun",
        False,
        {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4", "MASTER_PORT": "23456"},
    ),
    (
        "pytorchjob-pet-nproc-auto",
        "pytorchjob",
        {
            "MASTER_ADDR": "m",
            "MASTER_PORT": "1",
            "WORLD_SIZE": "2",
            "RANK": "1",
            "PET_NNODES": "2",
            "PET_NODE_RANK": "1",
            "PET_NPROC_PER_NODE": "auto",
            "FT_NPROC_PER_NODE": "2",
        },
        False,
        "torchrun",
        False,
        {"NPROC_PER_NODE": "2", "NODE_RANK": "1"},
    ),
    (
        "pytorchjob-elastic-nnodes",
        "pytorchjob",
        {"PET_NNODES": "1:4", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "2"},
        False,
        "torchrun",
        True,
        {"NNODES": "4"},
    ),
    (
        "pytorchjob-one-replica",
        "pytorchjob",
        {
            "MASTER_ADDR": "j-master-0",
            "MASTER_PORT": "23456",
            "WORLD_SIZE": "1",
            "RANK": "0",
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": "0",
        },
        False,
        "single",
        True,
        {"FORCE_TORCHRUN": None},
    ),
    (
        "deepspeedjob-rank0",
        "deepspeedjob",
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "8",
            "LOCAL_SIZE": "4",
            "CROSS_RANK": "0",
            "MASTER_ADDR": "ds-worker-0",
            "MASTER_PORT": "29500",
            "FORCE_TORCHRUN": "1",
        },
        False,
        "direct",
        True,
        {"FORCE_TORCHRUN": None, "NNODES": None, "MASTER_ADDR": "ds-worker-0"},
    ),
    (
        "deepspeedjob-rank5",
        "deepspeedjob",
        {
            "RANK": "5",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "8",
            "LOCAL_SIZE": "4",
            "MASTER_ADDR": "ds-worker-0",
            "MASTER_PORT": "29500",
        },
        True,
        "direct",
        False,
        {"FORCE_TORCHRUN": None},
    ),
    (
        "local-nproc-2",
        "local",
        {"FT_NPROC_PER_NODE": "2", "FT_MASTER_PORT": "41000"},
        False,
        "torchrun",
        True,
        {"FORCE_TORCHRUN": "1", "NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "2", "MASTER_PORT": "41000"},
    ),
]


@pytest.mark.parametrize(
    ("backend", "environ", "force", "mode", "primary", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_map_env(
    backend: str, environ: dict[str, str], force: bool, mode: str, primary: bool, expected: dict[str, Any]
) -> None:
    launch = plan_launch(backend, environ, force_torchrun=force)
    assert launch.mode == mode
    assert launch.primary is primary
    mapped = map_env(backend, environ, force_torchrun=force)
    for key, value in expected.items():
        if value is None:
            assert mapped.get(key) is None, key
            assert key not in apply_env(environ, mapped), key
        else:
            assert mapped[key] == value, key


def test_deepspeedjob_node_rank_from_ranks() -> None:
    launch = plan_launch("deepspeedjob", {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_SIZE": "4"})
    assert (launch.nnodes, launch.node_rank, launch.nproc_per_node) == (2, 1, 4)


ERRORS: list[tuple[str, str, dict[str, str], str]] = [
    ("unknown-backend", "slurm", {}, "unknown backend"),
    ("indexed-no-index", "job", {"FT_NNODES": "2", "FT_HEADLESS_SERVICE": "s"}, "JOB_COMPLETION_INDEX"),
    ("indexed-no-service", "job", {"FT_NNODES": "2", "JOB_COMPLETION_INDEX": "0"}, "FT_HEADLESS_SERVICE"),
    (
        "indexed-bad-hostname",
        "job",
        {"FT_NNODES": "2", "JOB_COMPLETION_INDEX": "0", "FT_HEADLESS_SERVICE": "s", "HOSTNAME": "x"},
        "FT_WORKLOAD_NAME",
    ),
    ("rank-out-of-range", "job", {"FT_NNODES": "2", "JOB_COMPLETION_INDEX": "2", "FT_MASTER_ADDR": "m"}, "not below"),
    ("not-a-number", "pytorchjob", {"PET_NNODES": "two", "MASTER_ADDR": "m"}, "not an integer"),
    ("no-master", "pytorchjob", {"PET_NNODES": "2", "PET_NODE_RANK": "1"}, "no master address"),
    (
        "bad-alias",
        "job",
        {"FT_NNODES": "2", "JOB_COMPLETION_INDEX": "0", "FT_MASTER_ADDR": "m", "FT_HOST_ALIASES": "oops"},
        "name=address",
    ),
    ("ds-rank-too-big", "deepspeedjob", {"RANK": "8", "WORLD_SIZE": "8"}, "not below"),
]


@pytest.mark.parametrize(("backend", "environ", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_map_env_errors(backend: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedEnvError, match=message) as info:
        plan_launch(backend, environ)
    assert info.value.exit_code == 8
