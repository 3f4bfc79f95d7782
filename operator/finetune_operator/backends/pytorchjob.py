"""``backend: pytorchjob``: Kubeflow training-operator's PyTorchJob (``kubeflow.org/v1``).

``Master`` (1 replica, rank 0, the only pod that reports progress) + ``Worker`` (nodes - 1); ``nprocPerNode``
(a string in the v1 API); the training operator injects MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and PET_*;
``runPolicy`` carries suspend, backoffLimit, ttlSecondsAfterFinished, cleanPodPolicy and, with the Volcano
scheduler, a gang ``schedulingPolicy``. The v1 API is frozen at the training-operator's last release line;
clusters with Kubeflow Trainer v2 use ``backend: trainjob``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.api.naming import workload_name
from finetune_operator.backends.base import (
    ChildStatus,
    ConditionKinds,
    Rule,
    StageInput,
    by_conditions,
    workload_rule,
)
from finetune_operator.backends.launch import Launch, Topology, env_int, env_nproc, torchrun_launch, torchrun_topology
from finetune_operator.render.meta import COMPONENT_TRAIN, metadata, run_scope
from finetune_operator.render.workloads import TTL_SECONDS_AFTER_FINISHED, created_suspended, kueue_labels, train_pod

#: What the controller's condition types mean (see :func:`~finetune_operator.backends.base.by_conditions`).
_CONDITIONS = ConditionKinds(succeeded=("Succeeded",), running=("Running", "Restarting"))


class PyTorchJobBackend:
    """Kubeflow PyTorchJob (see the module docstring)."""

    name: Final = "pytorchjob"
    api_version: Final = "kubeflow.org/v1"
    kind: Final = "PyTorchJob"
    plural: Final = "pytorchjobs"
    suspend_path: Final = ("spec", "runPolicy", "suspend")
    kueue: Final = True
    targets: Final = "Kubeflow training-operator v1 (kubeflow.org/v1, v1.8+ for runPolicy.suspend)"

    def build(self, inp: StageInput) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        job, stage = inp.job, inp.stage
        nodes = inp.nodes
        # ExitCode: exit codes 1-127 (our worker errors) are permanent, signals (preemption, OOM kill) restart.
        restart = "ExitCode"
        replicas: dict[str, Any] = {
            "Master": {
                "replicas": 1,
                "restartPolicy": restart,
                "template": train_pod(inp, self.name, service_account=inp.service_account, restart_policy="Never"),
            }
        }
        if nodes > 1:
            replicas["Worker"] = {
                "replicas": nodes - 1,
                "restartPolicy": restart,
                "template": train_pod(inp, self.name, service_account=None),
            }
        # Kubeflow's controller requires the container to be named "pytorch" to inject its environment.
        for r in replicas.values():
            r["template"]["spec"]["containers"][0]["name"] = "pytorch"
        run_policy: dict[str, Any] = {
            "backoffLimit": inp.backoff_limit,
            "cleanPodPolicy": "Running",
            "suspend": created_suspended(job),
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
        }
        sched = job.spec.scheduling
        if sched.scheduler_name == "volcano":
            policy: dict[str, Any] = {"minAvailable": nodes}
            if sched.priority_class_name:
                policy["priorityClass"] = sched.priority_class_name
            run_policy["schedulingPolicy"] = policy
        wl = {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": metadata(
                job, workload_name(run_scope(job), stage.name), COMPONENT_TRAIN, stage.name, **kueue_labels(job)
            ),
            "spec": {
                "nprocPerNode": str(inp.nproc_per_node),
                "pytorchReplicaSpecs": replicas,
                "runPolicy": run_policy,
            },
        }
        return [wl], wl

    def interpret(self, obj: Mapping[str, Any]) -> ChildStatus:
        """Conditions ``Succeeded``/``Failed``, ``Suspended``, ``Running``/``Restarting``."""
        return by_conditions(obj, self.suspend_path, _CONDITIONS)

    def rules(self) -> tuple[Rule, ...]:
        return (workload_rule(self, "training stages of the pytorchjob backend"),)

    def plan_launch(self, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
        """``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``/``PORT`` (torchrun's
        own environment defaults) are authoritative; without them (older operators) ``WORLD_SIZE`` counts pods
        and ``RANK`` is the pod's index."""
        if environ.get("PET_NNODES"):
            topo = torchrun_topology(environ)
        else:
            nnodes, node_rank = 1, 0
            if environ.get("WORLD_SIZE"):
                nnodes = env_int(environ, "WORLD_SIZE", minimum=1)
                node_rank = env_int(environ, "RANK", 0)
            port_raw = environ.get("PET_MASTER_PORT") or environ.get("MASTER_PORT")
            topo = Topology(
                nnodes=nnodes,
                node_rank=node_rank,
                nproc_per_node=env_nproc(environ, "PET_NPROC_PER_NODE"),
                master_addr=environ.get("PET_MASTER_ADDR") or environ.get("MASTER_ADDR"),
                master_port=env_int({"MASTER_PORT": port_raw}, "MASTER_PORT", minimum=1) if port_raw else None,
            )
        return torchrun_launch(self.name, topo, environ, force_torchrun=force_torchrun)


BACKEND: Final = PyTorchJobBackend()
