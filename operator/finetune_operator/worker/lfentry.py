"""LLaMA-Factory's training entry point with the checkpoint callback: ``python -m finetune_operator.worker.lfentry``.

Why not ``llamafactory-cli train``: the preemption/clock checkpoints (:mod:`.preempt`) need a Trainer callback in
every training process, and LLaMA-Factory takes callbacks only through ``run_exp(callbacks=...)``. Its CLI
offers no hook, and under torchrun it starts its own launcher file. So this module is both:

* the launcher: with ``FORCE_TORCHRUN`` set and outside torchrun (no ``LOCAL_RANK``) it starts ``torchrun`` the
  way LLaMA-Factory's launcher does (same variables: ``NNODES``, ``NODE_RANK``, ``NPROC_PER_NODE``,
  ``MASTER_ADDR``, ``MASTER_PORT``; ``RDZV_ID`` for elastic runs) with this module as the script;
* the trainer: otherwise it calls ``run_exp`` with :class:`PreemptionCallback`, reading the config and
  ``key=value`` overrides from the command line exactly like LLaMA-Factory. In a ``ppo`` stage (the worker sets
  ``FT_PPO_RUNTIME``) it first applies :mod:`.ppocompat`.

This module runs inside the trainer process and imports transformers/LLaMA-Factory; the worker never imports it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from finetune_operator.worker import ppo_runtime
from finetune_operator.worker.preempt import PREEMPTED_EXIT_CODE, Policy

log = logging.getLogger("finetune_operator.worker.lfentry")

MODULE = "finetune_operator.worker.lfentry"


def _all_reduce_max(device: Any) -> Any:
    def agree(flags: list[int]) -> list[int]:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flags
        t = torch.tensor(flags, dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    return agree


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PreemptionCallback(TrainerCallback):
    """Save at the next step boundary when the worker asks (then exit), and every N seconds if configured."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.policy is None:
            self.policy = Policy.from_env(os.environ, agree=_all_reduce_max(args.device))
        self.policy.training_begins(bool(state.is_local_process_zero))
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.policy is None:
            return control
        decision = self.policy.step_end()
        if decision.save:
            control.should_save = True
        if decision.stop:
            control.should_training_stop = True
            if state.is_world_process_zero:
                log.warning("preemption: saving a checkpoint at step %d, then exiting", state.global_step)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.policy is not None and self.policy.saved(int(state.global_step), bool(state.is_world_process_zero)):
            _barrier()  # every rank's shard is on disk before anyone exits
            if state.is_world_process_zero:
                log.warning("preemption: checkpoint-%d saved; exiting so that the retry resumes", state.global_step)
            raise SystemExit(PREEMPTED_EXIT_CODE)
        return control


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def torchrun_argv(environ: Mapping[str, str], args: Sequence[str]) -> list[str]:
    """torchrun's command line, mirroring LLaMA-Factory's launcher, with this module as the script."""
    nnodes = environ.get("NNODES", "1")
    nproc = environ.get("NPROC_PER_NODE", "1")
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    port = environ.get("MASTER_PORT") or str(_free_port())
    rdzv_id = environ.get("RDZV_ID")
    if rdzv_id is not None:
        rdzv_nnodes = nnodes
        if environ.get("MIN_NNODES") and environ.get("MAX_NNODES"):
            rdzv_nnodes = f"{environ['MIN_NNODES']}:{environ['MAX_NNODES']}"
        head = [
            "torchrun",
            "--nnodes",
            rdzv_nnodes,
            "--nproc-per-node",
            nproc,
            "--rdzv-id",
            rdzv_id,
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{addr}:{port}",
            "--max-restarts",
            environ.get("MAX_RESTARTS", "0"),
        ]
    else:
        head = [
            "torchrun",
            "--nnodes",
            nnodes,
            "--node_rank",
            environ.get("NODE_RANK", "0"),
            "--nproc_per_node",
            nproc,
            "--master_addr",
            addr,
            "--master_port",
            port,
        ]
    return [*head, "-m", MODULE, *args]


def _forced(environ: Mapping[str, str]) -> bool:
    return environ.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "y", "yes")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if _forced(os.environ) and "LOCAL_RANK" not in os.environ:
        env = dict(os.environ)
        if env.get("OPTIM_TORCH", "1").lower() in ("1", "true", "y", "yes"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
            env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
        argv = torchrun_argv(env, args)
        # The line LLaMA-Factory's launcher prints, kept so that logs read the same as with llamafactory-cli.
        where = (
            argv[argv.index("--master_addr") + 1] + ":" + argv[argv.index("--master_port") + 1]
            if ("--master_addr" in argv)
            else argv[argv.index("--rdzv-endpoint") + 1]
        )
        print(f"Initializing {env.get('NPROC_PER_NODE', '1')} distributed tasks at: {where}", flush=True)
        return subprocess.run(argv, env=env, check=False).returncode

    runtime = os.environ.get(ppo_runtime.RUNTIME_ENV)
    shims: list[str] = []
    if runtime:  # a ppo stage, started by the worker with the PPO trl first on PYTHONPATH
        from finetune_operator.worker import ppocompat

        shims = ppocompat.install(runtime)

    from llamafactory.train.tuner import run_exp

    sys.argv = [sys.argv[0], *args]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if runtime:
        log.info("ppo stage: the PPO trl from %s; shims: %s", runtime, ", ".join(shims) or "none")
    run_exp(callbacks=[PreemptionCallback()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
