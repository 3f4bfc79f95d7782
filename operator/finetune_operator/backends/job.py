"""``backend: job``: batch/v1 Job, Indexed with a headless Service when a stage has several nodes.

One node: a plain Job. ``nodes > 1``: an Indexed Job (``completionMode: Indexed``, one pod per node) and a
headless Service; pod ``<job>-0`` is reachable as ``<job>-0.<service>`` and is the rendezvous master
(``FT_MASTER_ADDR``); the worker maps ``JOB_COMPLETION_INDEX`` to the node rank. ``podFailurePolicy`` fails fast
on exit codes a retry cannot fix and does not count disruptions (preemption, node drain) against
``backoffLimit``. Needs no controller beyond Kubernetes itself; Kueue admits Jobs natively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.api.naming import service_name, workload_name
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
from finetune_operator.backends.launch import (
    DistributedEnvError,
    Launch,
    Topology,
    env_int,
    torchrun_launch,
)
from finetune_operator.render.meta import COMPONENT_TRAIN, metadata, run_scope, selector_labels
from finetune_operator.render.workloads import MASTER_PORT, batch_job, train_pod


class JobBackend:
    """batch/v1 Job (see the module docstring)."""

    name: Final = "job"
    api_version: Final = "batch/v1"
    kind: Final = "Job"
    plural: Final = "jobs"
    suspend_path: Final = ("spec", "suspend")
    kueue: Final = True
    targets: Final = "Kubernetes batch/v1 (Indexed Jobs: 1.24+, podFailurePolicy: 1.31+)"

    def build(self, inp: StageInput) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        job, stage = inp.job, inp.stage
        name = workload_name(run_scope(job), stage.name)
        if inp.nodes == 1:
            tpl = train_pod(inp, self.name, service_account=inp.service_account)
            wl = batch_job(job, name, COMPONENT_TRAIN, stage.name, tpl, backoff_limit=inp.backoff_limit)
            return [wl], wl
        svc = service_name(run_scope(job), stage.name)
        extra = [
            {"name": "FT_WORKLOAD_NAME", "value": name},
            {"name": "FT_HEADLESS_SERVICE", "value": svc},
            {"name": "FT_MASTER_ADDR", "value": f"{name}-0.{svc}"},
            {"name": "FT_MASTER_PORT", "value": str(MASTER_PORT)},
        ]
        tpl = train_pod(inp, self.name, service_account=inp.service_account, extra_env=extra, subdomain=svc)
        tpl["spec"]["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": MASTER_PORT}]
        headless = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(job, svc, COMPONENT_TRAIN, stage.name),
            "spec": {
                "clusterIP": "None",
                # Rendezvous happens before any pod could be "ready": publish addresses immediately.
                "publishNotReadyAddresses": True,
                "selector": selector_labels(job, COMPONENT_TRAIN, stage.name),
                "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
            },
        }
        # A lost pod breaks the whole rendezvous: every node restarts, so allow that many pod failures.
        wl = batch_job(
            job,
            name,
            COMPONENT_TRAIN,
            stage.name,
            tpl,
            backoff_limit=inp.backoff_limit * inp.nodes,
            completions=inp.nodes,
        )
        return [headless, wl], wl

    def interpret(self, obj: Mapping[str, Any]) -> ChildStatus:
        """Conditions ``Complete``/``SuccessCriteriaMet`` and ``Failed``; running once it has a start time."""
        conds = conditions(obj)
        suspended = bool(read_path(obj, self.suspend_path))
        done = true_condition(conds, "Complete", "SuccessCriteriaMet")
        if done is not None:
            return cond_status(Phase.SUCCEEDED, done)
        failed = true_condition(conds, "Failed")
        if failed is not None:
            return cond_status(Phase.FAILED, failed)
        if suspended:
            cond = conds.get("Suspended") or {}
            return cond_status(Phase.SUSPENDED, cond, suspended=True)
        status = obj.get("status") or {}
        if int(status.get("active") or 0) > 0 or status.get("startTime"):
            return ChildStatus(Phase.RUNNING)
        return ChildStatus(Phase.PENDING)

    def rules(self) -> tuple[Rule, ...]:
        # The headless Service of multi-node stages is among the core rules (the vLLM Service needs the same).
        return (workload_rule(self, "download, training (job backend) and merge Jobs"),)

    def plan_launch(self, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
        """``JOB_COMPLETION_INDEX`` is the node rank, ``FT_NNODES`` the node count; the master is pod 0 behind
        the headless Service: ``<job name>-0.<FT_HEADLESS_SERVICE>`` (the Job name from ``FT_WORKLOAD_NAME``,
        else from the pod's ``HOSTNAME`` ``<job name>-<index>``); ``FT_MASTER_ADDR`` overrides the address."""
        return torchrun_launch(self.name, indexed_job_topology(environ), environ, force_torchrun=force_torchrun)


def indexed_job_topology(environ: Mapping[str, str]) -> Topology:
    """The topology of a (possibly Indexed) Job pod."""
    nnodes = env_int(environ, "FT_NNODES", 1, minimum=1)
    if nnodes == 1:
        return Topology()
    return Topology(
        nnodes=nnodes, node_rank=env_int(environ, "JOB_COMPLETION_INDEX"), master_addr=_indexed_job_master(environ)
    )


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


BACKEND: Final = JobBackend()
