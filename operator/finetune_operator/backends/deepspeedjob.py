"""``backend: deepspeedjob``: T9k's DeepSpeedJob (``batch.tensorstack.dev/v1beta1``).

T9k's API reference spells the kind ``DeepSpeedJob`` (some of its guides write ``DeepspeedJob``) and the slot
count ``config.slotsPerWorker`` (one guide example writes ``slotPerWorker``); we follow the API reference. The
controller starts DeepSpeed's launcher over SSH, which starts ``slotsPerWorker`` processes on every worker, each
running ``config.run.exec`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR set: so the worker trains in-process
(``FT_BACKEND=deepspeedjob``) instead of starting torchrun itself. ``localRank: false`` keeps the launcher from
appending ``--local_rank=N`` to our argv (LOCAL_RANK is in the environment). The launcher needs sshd and root
(``/root/.ssh``), so these pods cannot be Pod Security "restricted"; they keep RuntimeDefault seccomp only.
There is no ``suspend``: T9k pauses with ``spec.runMode.pause.enabled`` (replicas deleted, job kept). Kueue has
no DeepSpeedJob integration, so a queue name only reaches T9k's own scheduler (``t9k-scheduler``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.api.naming import workload_name
from finetune_operator.backends.base import (
    ChildStatus,
    Phase,
    Rule,
    StageInput,
    cond_status,
    conditions,
    read_path,
    true_condition,
    workload_rule,
)
from finetune_operator.backends.job import indexed_job_topology
from finetune_operator.backends.launch import DistributedEnvError, Launch, env_int, resolve, torchrun_launch
from finetune_operator.render.meta import COMPONENT_TRAIN, metadata, run_scope
from finetune_operator.render.pods import worker_command
from finetune_operator.render.workloads import train_pod

#: The preStop hook of the worker containers (see :mod:`finetune_operator.worker.stopping`).
STOP_COMMAND: Final = ["ftctl", "worker", "stop"]

_PHASES: Final = {
    "Succeeded": Phase.SUCCEEDED,
    "Failed": Phase.FAILED,
    "Running": Phase.RUNNING,
    "Resuming": Phase.RUNNING,
    "Paused": Phase.SUSPENDED,
    "Pending": Phase.PENDING,
}


class DeepSpeedJobBackend:
    """T9k DeepSpeedJob (see the module docstring)."""

    name: Final = "deepspeedjob"
    api_version: Final = "batch.tensorstack.dev/v1beta1"
    kind: Final = "DeepSpeedJob"
    plural: Final = "deepspeedjobs"
    suspend_path: Final = ("spec", "runMode", "pause", "enabled")
    kueue: Final = False
    targets: Final = "T9k DeepSpeedJob batch.tensorstack.dev/v1beta1 (T9k API reference)"

    def build(self, inp: StageInput) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        job, stage = inp.job, inp.stage
        tpl = train_pod(inp, self.name, service_account=inp.service_account, restart_policy="Never", restricted=False)
        # T9k picks the container named "worker" as the training container.
        tpl["spec"]["containers"][0].pop("command", None)
        # The worker image runs as 65532 with HOME=/tmp; T9k's launcher model needs root (sshd, /root/.ssh) and
        # DeepSpeed's runner reads ~/.deepspeed_env, so these pods say root and root's home explicitly (with the
        # image's user, sshd cannot even read its host key).
        tpl["spec"]["securityContext"] = {"runAsUser": 0, "runAsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"}}
        tpl["spec"]["containers"][0]["env"].append({"name": "HOME", "value": "/root"})
        # PID 1 of a T9k worker pod is sshd, so the kubelet's SIGTERM never reaches our trainers (they die with
        # sshd): a preStop hook makes them checkpoint and exit first (finetune_operator.worker.stopping).
        tpl["spec"]["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": STOP_COMMAND}}}
        spec: dict[str, Any] = {
            "config": {
                "slotsPerWorker": inp.nproc_per_node,
                "localRank": False,
                "run": {"exec": worker_command("train", stage.name, config_dir=inp.resolver.config_dir)},
            },
            "worker": {"replicas": inp.nodes, "restartPolicy": "ExitCode", "template": tpl},
            "runPolicy": {"backoffLimit": inp.backoff_limit, "cleanUpPolicy": "Unfinished"},
        }
        if job.spec.suspend:
            spec["runMode"] = {"pause": {"enabled": True}}
        if job.spec.scheduling.scheduler_name == "t9k-scheduler" and job.spec.scheduling.queue_name:
            spec["scheduler"] = {"t9kScheduler": {"queue": job.spec.scheduling.queue_name}}
        wl = {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": metadata(job, workload_name(run_scope(job), stage.name), COMPONENT_TRAIN, stage.name),
            "spec": spec,
        }
        return [wl], wl

    def interpret(self, obj: Mapping[str, Any]) -> ChildStatus:
        """``status.phase`` (Pending, Running, Paused, Resuming, Succeeded, Failed, Unknown); conditions as a
        fallback for older controllers."""
        status = obj.get("status") or {}
        conds = conditions(obj)
        suspended = bool(read_path(obj, self.suspend_path))
        phase = _PHASES.get(str(status.get("phase") or ""))
        if phase is None:
            if true_condition(conds, "Completed", "Complete", "Succeeded") is not None:
                phase = Phase.SUCCEEDED
            elif true_condition(conds, "Failed") is not None:
                phase = Phase.FAILED
            elif true_condition(conds, "Running") is not None:
                phase = Phase.RUNNING
            else:
                phase = Phase.PENDING
        if phase in (Phase.PENDING, Phase.RUNNING) and suspended:
            phase = Phase.SUSPENDED
        cond = true_condition(conds, "Failed") if phase == Phase.FAILED else None
        if cond is not None:
            return cond_status(phase, cond, suspended=suspended)
        return ChildStatus(phase, reason=f"DeepSpeedJob{phase}" if phase == Phase.FAILED else "", suspended=suspended)

    def rules(self) -> tuple[Rule, ...]:
        return (workload_rule(self, "training stages of the deepspeedjob backend"),)

    def plan_launch(self, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
        """The ``deepspeed`` launcher on the first replica starts one process per slot on every replica (over
        pdsh) with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` already set: the
        worker must not start torchrun again; it runs LLaMA-Factory's training entry point directly (mode
        ``direct``). Without ``RANK`` (a single replica with no launcher environment) it is treated like a Job
        pod."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return torchrun_launch(self.name, indexed_job_topology(environ), environ, force_torchrun=force_torchrun)
        rank = env_int(environ, "RANK")
        world = env_int(environ, "WORLD_SIZE", minimum=1)
        if rank >= world:
            raise DistributedEnvError(f"RANK={rank} is not below WORLD_SIZE={world}")
        local = env_int(environ, "LOCAL_RANK", 0)
        local_size = env_int(environ, "LOCAL_SIZE", 1, minimum=1)
        # Drop FORCE_TORCHRUN/NNODES/...: they would make a nested torchrun wait for peers that never come.
        env: dict[str, str | None] = {k: None for k in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "FORCE_TORCHRUN")}
        if "MASTER_ADDR" in environ:
            env["MASTER_ADDR"] = resolve(environ["MASTER_ADDR"], environ)
        return Launch(
            mode="direct",
            nnodes=max(1, world // local_size),
            node_rank=env_int(environ, "CROSS_RANK", (rank - local) // local_size),
            nproc_per_node=local_size,
            primary=rank == 0,
            env=env,
        )


BACKEND: Final = DeepSpeedJobBackend()
