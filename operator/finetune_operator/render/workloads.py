"""Workloads: download Job, training workloads per backend, merge Job; and where each kind keeps ``suspend``.

Training backends (``spec.backend``):

``job`` (batch/v1)
    One node: a plain Job. ``nodes > 1``: an Indexed Job (``completionMode: Indexed``, one pod per node) and a
    headless Service; pod ``<job>-0`` is reachable as ``<job>-0.<service>`` and is the rendezvous master
    (``FT_MASTER_ADDR``); the worker maps ``JOB_COMPLETION_INDEX`` to the node rank.
    ``podFailurePolicy`` fails fast on exit codes a retry cannot fix and does not count disruptions
    (preemption, node drain) against ``backoffLimit``.
``pytorchjob`` (kubeflow.org/v1)
    ``Master`` (1 replica, rank 0, the only pod that reports progress) + ``Worker`` (nodes - 1);
    ``nprocPerNode`` (a string in the v1 API); the training operator injects MASTER_ADDR, MASTER_PORT,
    WORLD_SIZE, RANK and PET_*; ``runPolicy`` carries suspend, backoffLimit, ttlSecondsAfterFinished,
    cleanPodPolicy and, with the Volcano scheduler, a gang ``schedulingPolicy``.
``deepspeedjob`` (batch.tensorstack.dev/v1beta1, kind ``DeepSpeedJob``)
    T9k's API reference spells the kind ``DeepSpeedJob`` (some of its guides write ``DeepspeedJob``) and the
    slot count ``config.slotsPerWorker`` (one guide example writes ``slotPerWorker``); we follow the API
    reference. The controller starts DeepSpeed's launcher over SSH, which starts ``slotsPerWorker`` processes
    on every worker, each running ``config.run.exec`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR set:
    so the worker trains in-process (``FT_BACKEND=deepspeedjob``) instead of starting torchrun itself.
    ``localRank: false`` keeps the launcher from appending ``--local_rank=N`` to our argv (LOCAL_RANK is in
    the environment). The launcher needs sshd and root (``/root/.ssh``), so these pods cannot be Pod Security
    "restricted"; they keep RuntimeDefault seccomp only. There is no ``suspend``: T9k pauses with
    ``spec.runMode.pause.enabled`` (replicas deleted, job kept).

Kueue: with ``spec.scheduling.queueName`` batch Jobs and PyTorchJobs get ``kueue.x-k8s.io/queue-name`` and are
created suspended (Kueue unsuspends them on admission). Kueue has no DeepSpeedJob integration, so those only
honour ``spec.suspend``.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.naming import service_name, workload_name
from finetune_operator.api.types import FineTuneJob, StageSpec
from finetune_operator.errors import RenderError
from finetune_operator.render import checkpoint, paths
from finetune_operator.render.meta import (
    COMPONENT_DOWNLOAD,
    COMPONENT_MERGE,
    COMPONENT_TRAIN,
    metadata,
    run_scope,
    selector_labels,
)
from finetune_operator.render.plan import PathResolver
from finetune_operator.render.pods import (
    NON_RETRYABLE_EXIT_CODES,
    WORKER_CONTAINER,
    PodOptions,
    Resources,
    pod_template,
    worker_command,
    worker_env,
)

JOB_API = "batch/v1"
PYTORCHJOB_API = "kubeflow.org/v1"
PYTORCHJOB_KIND = "PyTorchJob"
DEEPSPEEDJOB_API = "batch.tensorstack.dev/v1beta1"
DEEPSPEEDJOB_KIND = "DeepSpeedJob"

#: Rendezvous port of multi-node Indexed Jobs (torchrun's conventional port).
MASTER_PORT = 29500
#: Finished workloads are garbage-collected after a week; the completion markers on the volume, not the
#: workload objects, are what make a re-run a no-op.
TTL_SECONDS_AFTER_FINISHED = 7 * 24 * 3600

DOWNLOAD = "download"
MERGE = "merge"

#: Where ``suspend`` lives in each workload kind (see :func:`suspend_path`).
_SUSPEND_PATHS: dict[str, tuple[str, ...]] = {
    "Job": ("spec", "suspend"),
    PYTORCHJOB_KIND: ("spec", "runPolicy", "suspend"),
    DEEPSPEEDJOB_KIND: ("spec", "runMode", "pause", "enabled"),
}


def suspend_path(kind: str) -> tuple[str, ...]:
    """The path of the boolean that suspends a workload of ``kind``; set it to true/false to suspend/resume.

    ``Job``: ``spec.suspend``. ``PyTorchJob``: ``spec.runPolicy.suspend``. ``DeepSpeedJob``: T9k has no
    suspend; its pause mode ``spec.runMode.pause.enabled`` deletes the replicas and keeps the job, which is
    what suspension means here (training resumes from the last checkpoint). Raises KeyError for other kinds
    (a Deployment is "suspended" by scaling it, not by a flag).
    """
    return _SUSPEND_PATHS[kind]


def _created_suspended(job: FineTuneJob, *, kueue: bool = True) -> bool:
    return job.spec.suspend or (kueue and bool(job.spec.scheduling.queue_name))


def _kueue_labels(job: FineTuneJob) -> dict[str, str]:
    q = job.spec.scheduling.queue_name
    return {c.LABEL_KUEUE_QUEUE: q} if q else {}


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": WORKER_CONTAINER,
                    "operator": "In",
                    "values": list(NON_RETRYABLE_EXIT_CODES),
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def batch_job(
    job: FineTuneJob,
    name: str,
    component: str,
    stage: str,
    template: dict[str, Any],
    *,
    backoff_limit: int,
    completions: int = 1,
) -> dict[str, Any]:
    """A batch/v1 Job around ``template`` (Indexed when ``completions > 1``)."""
    spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "suspend": _created_suspended(job),
        "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
        "podFailurePolicy": _pod_failure_policy(),
        "template": template,
    }
    if completions > 1:
        spec.update({"completionMode": "Indexed", "completions": completions, "parallelism": completions})
    return {
        "apiVersion": JOB_API,
        "kind": "Job",
        "metadata": metadata(job, name, component, stage, **_kueue_labels(job)),
        "spec": spec,
    }


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def download_config(job: FineTuneJob, resolver: PathResolver) -> dict[str, Any]:
    """``download.yaml``: what the download worker fetches and where (no token: that is an env var)."""
    model = job.spec.model
    cfg: dict[str, Any] = {"source": model.source, "hub": model.hub, "local_dir": paths.model_dir(job, resolver)}
    if model.revision:
        cfg["revision"] = model.revision
    return cfg


#: Env var the download worker reads the hub token from, per hub.
TOKEN_ENV = {"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}


def download_job(job: FineTuneJob, image: str, backoff_limit: int, resolver: PathResolver) -> dict[str, Any]:
    """The Job that fills ``model.volume`` from the hub; the token only as ``secretKeyRef``."""
    model = job.spec.model
    env = worker_env(job, DOWNLOAD, "job", offline=False)
    if model.token_secret_ref is not None:
        ref = model.token_secret_ref
        env.append(
            {
                "name": TOKEN_ENV[model.hub],
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": False}},
            }
        )
    tpl = pod_template(
        job,
        PodOptions(
            component=COMPONENT_DOWNLOAD,
            stage=DOWNLOAD,
            image=image,
            command=worker_command("download", config_dir=resolver.config_dir),
            env=env,
            resources=Resources(cpu="2", memory="8Gi"),
            write_claims=[model.volume.claim_name],
        ),
        resolver,
    )
    return batch_job(
        job, workload_name(run_scope(job), DOWNLOAD), COMPONENT_DOWNLOAD, DOWNLOAD, tpl, backoff_limit=backoff_limit
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _train_claims(job: FineTuneJob, stage: StageSpec) -> tuple[list[str], list[str]]:
    by_name = {d.name: d for d in job.spec.datasets}
    read = [job.spec.model.volume.claim_name] + [by_name[n].volume.claim_name for n in stage.datasets]
    return read, [job.spec.output.volume.claim_name]


def _train_pod(
    job: FineTuneJob,
    stage: StageSpec,
    image: str,
    backend: str,
    resolver: PathResolver,
    *,
    service_account: str | None,
    extra_env: list[dict[str, Any]] | None = None,
    restart_policy: str = "Never",
    restricted: bool = True,
    subdomain: str | None = None,
) -> dict[str, Any]:
    res = stage.resources
    gpus = res.gpus_per_node if res is not None else 1
    read, write = _train_claims(job, stage)
    env = worker_env(job, stage.name, backend, nproc_per_node=max(gpus, 1), redirect_home=restricted)
    env.append({"name": "FT_NNODES", "value": str(res.nodes if res else 1)})
    env += checkpoint.checkpoint_env(stage)
    env += extra_env or []
    return pod_template(
        job,
        PodOptions(
            component=COMPONENT_TRAIN,
            stage=stage.name,
            image=image,
            command=worker_command("train", stage.name, config_dir=resolver.config_dir),
            env=env,
            resources=Resources(gpus=gpus, cpu=res.cpu if res else None, memory=res.memory if res else None),
            read_claims=read,
            write_claims=write,
            service_account=service_account,
            restart_policy=restart_policy,
            restricted=restricted,
            read_only_root=restricted,
            hostname_subdomain=subdomain,
            termination_grace_seconds=checkpoint.grace_seconds(stage),
        ),
        resolver,
    )


def train_objects(
    job: FineTuneJob,
    stage: StageSpec,
    *,
    image: str,
    service_account: str,
    backoff_limit: int,
    resolver: PathResolver,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The objects of one training stage (in creation order) and which of them is the workload."""
    backend = job.spec.resolved_backend()
    nodes = stage.resources.nodes if stage.resources else 1
    gpus = stage.resources.gpus_per_node if stage.resources else 1
    name = workload_name(run_scope(job), stage.name)
    if backend == "job":
        if nodes == 1:
            tpl = _train_pod(job, stage, image, backend, resolver, service_account=service_account)
            wl = batch_job(job, name, COMPONENT_TRAIN, stage.name, tpl, backoff_limit=backoff_limit)
            return [wl], wl
        svc = service_name(run_scope(job), stage.name)
        extra = [
            {"name": "FT_WORKLOAD_NAME", "value": name},
            {"name": "FT_HEADLESS_SERVICE", "value": svc},
            {"name": "FT_MASTER_ADDR", "value": f"{name}-0.{svc}"},
            {"name": "FT_MASTER_PORT", "value": str(MASTER_PORT)},
        ]
        tpl = _train_pod(
            job, stage, image, backend, resolver, service_account=service_account, extra_env=extra, subdomain=svc
        )
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
            backoff_limit=backoff_limit * nodes,
            completions=nodes,
        )
        return [headless, wl], wl
    if backend == "pytorchjob":
        return [wl := pytorch_job(job, stage, image, service_account, backoff_limit, resolver)], wl
    if backend == "deepspeedjob":
        return [wl := deepspeed_job(job, stage, image, service_account, backoff_limit, resolver, gpus)], wl
    raise RenderError(f"unknown backend {backend!r}")


def pytorch_job(
    job: FineTuneJob,
    stage: StageSpec,
    image: str,
    service_account: str,
    backoff_limit: int,
    resolver: PathResolver,
) -> dict[str, Any]:
    """A Kubeflow PyTorchJob: Master (rank 0, reports progress) + Worker replicas."""
    nodes = stage.resources.nodes if stage.resources else 1
    gpus = stage.resources.gpus_per_node if stage.resources else 1
    # ExitCode: exit codes 1-127 (our worker errors) are permanent, signals (preemption, OOM kill) restart.
    restart = "ExitCode"
    replicas: dict[str, Any] = {
        "Master": {
            "replicas": 1,
            "restartPolicy": restart,
            "template": _train_pod(
                job, stage, image, "pytorchjob", resolver, service_account=service_account, restart_policy="Never"
            ),
        }
    }
    if nodes > 1:
        replicas["Worker"] = {
            "replicas": nodes - 1,
            "restartPolicy": restart,
            "template": _train_pod(job, stage, image, "pytorchjob", resolver, service_account=None),
        }
    # Kubeflow's controller requires the container to be named "pytorch" to inject its environment.
    for r in replicas.values():
        r["template"]["spec"]["containers"][0]["name"] = "pytorch"
    run_policy: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "cleanPodPolicy": "Running",
        "suspend": _created_suspended(job),
        "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
    }
    sched = job.spec.scheduling
    if sched.scheduler_name == "volcano":
        policy: dict[str, Any] = {"minAvailable": nodes}
        if sched.priority_class_name:
            policy["priorityClass"] = sched.priority_class_name
        run_policy["schedulingPolicy"] = policy
    return {
        "apiVersion": PYTORCHJOB_API,
        "kind": PYTORCHJOB_KIND,
        "metadata": metadata(
            job, workload_name(run_scope(job), stage.name), COMPONENT_TRAIN, stage.name, **_kueue_labels(job)
        ),
        "spec": {
            "nprocPerNode": str(max(gpus, 1)),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": run_policy,
        },
    }


def deepspeed_job(
    job: FineTuneJob,
    stage: StageSpec,
    image: str,
    service_account: str,
    backoff_limit: int,
    resolver: PathResolver,
    gpus: int,
) -> dict[str, Any]:
    """A T9k DeepSpeedJob (see the module docstring for the launch model)."""
    nodes = stage.resources.nodes if stage.resources else 1
    tpl = _train_pod(
        job,
        stage,
        image,
        "deepspeedjob",
        resolver,
        service_account=service_account,
        restart_policy="Never",
        restricted=False,
    )
    # T9k picks the container named "worker" as the training container.
    tpl["spec"]["containers"][0].pop("command", None)
    spec: dict[str, Any] = {
        "config": {
            "slotsPerWorker": max(gpus, 1),
            "localRank": False,
            "run": {"exec": worker_command("train", stage.name, config_dir=resolver.config_dir)},
        },
        "worker": {"replicas": nodes, "restartPolicy": "ExitCode", "template": tpl},
        "runPolicy": {"backoffLimit": backoff_limit, "cleanUpPolicy": "Unfinished"},
    }
    if job.spec.suspend:
        spec["runMode"] = {"pause": {"enabled": True}}
    if job.spec.scheduling.scheduler_name == "t9k-scheduler" and job.spec.scheduling.queue_name:
        spec["scheduler"] = {"t9kScheduler": {"queue": job.spec.scheduling.queue_name}}
    return {
        "apiVersion": DEEPSPEEDJOB_API,
        "kind": DEEPSPEEDJOB_KIND,
        "metadata": metadata(job, workload_name(run_scope(job), stage.name), COMPONENT_TRAIN, stage.name),
        "spec": spec,
    }


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------


def merge_job(job: FineTuneJob, image: str, backoff_limit: int, resolver: PathResolver) -> dict[str, Any]:
    """The Job running ``llamafactory-cli export`` (base + adapters -> ``<out>/<job>/merged``)."""
    merge = job.spec.merge
    res = merge.resources
    gpus = 0
    if merge.export_device == "auto":
        gpus = res.gpus_per_node if res is not None else 1
    read = [job.spec.model.volume.claim_name]
    tpl = pod_template(
        job,
        PodOptions(
            component=COMPONENT_MERGE,
            stage=MERGE,
            image=image,
            command=worker_command("merge", config_dir=resolver.config_dir),
            env=worker_env(job, MERGE, "job"),
            resources=Resources(gpus=gpus, cpu=res.cpu if res else None, memory=res.memory if res else None),
            read_claims=read,
            write_claims=[job.spec.output.volume.claim_name],
        ),
        resolver,
    )
    return batch_job(
        job, workload_name(run_scope(job), MERGE), COMPONENT_MERGE, MERGE, tpl, backoff_limit=backoff_limit
    )
