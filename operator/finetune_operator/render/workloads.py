"""Workloads: the download and merge Jobs, the pieces every training backend shares, and the dispatch to them.

The training workload of a stage is built by its backend (:mod:`finetune_operator.backends`: Job, PyTorchJob,
DeepSpeedJob, TrainJob); this module keeps what they share: :func:`train_pod` (the training pod template with the
``FT_*`` environment), :func:`batch_job`, the Kueue label and the created-suspended rule. Kueue: with
``spec.scheduling.queueName`` workloads of kinds Kueue integrates get ``kueue.x-k8s.io/queue-name`` and are
created suspended (Kueue unsuspends them on admission).

The backends are imported lazily (inside :func:`train_objects` and :func:`suspend_path`): they build on this
module, and this module is loaded with the ``render`` package.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.naming import workload_name
from finetune_operator.api.types import FineTuneJob, StageSpec
from finetune_operator.errors import RenderError
from finetune_operator.render import checkpoint, paths, tracking
from finetune_operator.render.meta import (
    COMPONENT_DOWNLOAD,
    COMPONENT_MERGE,
    COMPONENT_PREFLIGHT,
    COMPONENT_TRAIN,
    metadata,
    run_scope,
)
from finetune_operator.render.plan import PathResolver, StageInput
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

#: Rendezvous port of multi-node Indexed Jobs (torchrun's conventional port).
MASTER_PORT = 29500
#: Finished workloads are garbage-collected after a week; the completion markers on the volume, not the
#: workload objects, are what make a re-run a no-op.
TTL_SECONDS_AFTER_FINISHED = 7 * 24 * 3600

DOWNLOAD = "download"
PREFLIGHT = "preflight"
MERGE = "merge"


def suspend_path(kind: str) -> tuple[str, ...]:
    """The path of the boolean that suspends a workload of ``kind``; set it to true/false to suspend/resume.

    Each backend knows its own (``Job``: ``spec.suspend``; ``PyTorchJob``: ``spec.runPolicy.suspend``;
    ``DeepSpeedJob``: T9k's pause mode ``spec.runMode.pause.enabled``; ``TrainJob``: ``spec.suspend``). Raises
    KeyError for other kinds (a Deployment is "suspended" by scaling it, not by a flag).
    """
    from finetune_operator import backends

    backend = backends.by_kind(kind)
    if backend is None:
        raise KeyError(kind)
    return backend.suspend_path


def created_suspended(job: FineTuneJob, *, kueue: bool = True) -> bool:
    """Created suspended: the user asked (``spec.suspend``), or Kueue must admit it first (a queue name)."""
    return job.spec.suspend or (kueue and bool(job.spec.scheduling.queue_name))


def kueue_labels(job: FineTuneJob) -> dict[str, str]:
    """Kueue's queue-name label when ``spec.scheduling.queueName`` is set."""
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
        "suspend": created_suspended(job),
        "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
        "podFailurePolicy": _pod_failure_policy(),
        "template": template,
    }
    if completions > 1:
        spec.update({"completionMode": "Indexed", "completions": completions, "parallelism": completions})
    return {
        "apiVersion": JOB_API,
        "kind": "Job",
        "metadata": metadata(job, name, component, stage, **kueue_labels(job)),
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
# Preflight
# --------------------------------------------------------------------------------------------------


def preflight_enabled(job: FineTuneJob) -> bool:
    """The preflight step runs unless ``spec.preflight.mode`` is ``Disabled``."""
    return job.spec.preflight.mode != "Disabled"


def preflight_config(job: FineTuneJob) -> dict[str, Any]:
    """``preflight.json``: the FineTuneJob the preflight pod plans (name, namespace, spec). Not even the *name*
    of the hub-token Secret goes in (the ConfigMap carries no reference to credentials; planning needs none)."""
    spec = job.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec.get("model", {}).pop("tokenSecretRef", None)
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": job.name, "namespace": job.namespace},
        "spec": spec,
    }


def preflight_job(job: FineTuneJob, image: str, service_account: str | None, resolver: PathResolver) -> dict[str, Any]:
    """The CPU-only Job that plans every stage against the real volumes (read-only) before any GPU workload.

    It reads the model's config.json and tokenizer and every dataset of every stage (LLaMA-Factory's own
    loaders, no model weights), writes ``status.plan`` through the worker ServiceAccount (which may patch
    ``finetunejobs/status`` only), and exits 3 (``InvalidData``) or 12 (``WillNotFit``) to refuse: both are
    FailJob exit codes, so a refused job is not retried. No retries either way (``backoffLimit: 0``): the
    check is deterministic.
    """
    read = [job.spec.model.volume.claim_name] + [d.volume.claim_name for d in job.spec.datasets]
    tpl = pod_template(
        job,
        PodOptions(
            component=COMPONENT_PREFLIGHT,
            stage=PREFLIGHT,
            image=image,
            command=worker_command("preflight", config_dir=resolver.config_dir),
            env=worker_env(job, PREFLIGHT, "job"),
            resources=Resources(cpu="2", memory="8Gi"),
            read_claims=read,
            service_account=service_account,
        ),
        resolver,
    )
    return batch_job(
        job, workload_name(run_scope(job), PREFLIGHT), COMPONENT_PREFLIGHT, PREFLIGHT, tpl, backoff_limit=0
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _train_claims(job: FineTuneJob, stage: StageSpec) -> tuple[list[str], list[str]]:
    by_name = {d.name: d for d in job.spec.datasets}
    read = [job.spec.model.volume.claim_name] + [by_name[n].volume.claim_name for n in stage.datasets]
    read += [m.claim_name for n in stage.datasets if (m := by_name[n].media) is not None]
    # Models a stage names on volumes (ppo's reward model, a reference): read-only like the base model.
    read += [r.volume.claim_name for r in (stage.reward_model, stage.reference) if r is not None and r.volume]
    return read, [job.spec.output.volume.claim_name]


def train_pod(
    inp: StageInput,
    backend: str,
    *,
    service_account: str | None,
    extra_env: list[dict[str, Any]] | None = None,
    restart_policy: str = "Never",
    restricted: bool = True,
    subdomain: str | None = None,
) -> dict[str, Any]:
    """The pod template of a training stage's pods: the worker's ``train`` command, the ``FT_*`` environment
    (``FT_BACKEND`` tells the worker which environment mapping applies), model and data read-only, the output
    writable."""
    job, stage = inp.job, inp.stage
    res = stage.resources
    read, write = _train_claims(job, stage)
    env = worker_env(job, stage.name, backend, nproc_per_node=inp.nproc_per_node, redirect_home=restricted)
    env.append({"name": "FT_NNODES", "value": str(inp.nodes)})
    env += checkpoint.checkpoint_env(stage)
    env += tracking.training_env(job)
    env += extra_env or []
    return pod_template(
        job,
        PodOptions(
            component=COMPONENT_TRAIN,
            stage=stage.name,
            image=inp.image,
            command=worker_command("train", stage.name, config_dir=inp.resolver.config_dir),
            env=env,
            resources=Resources(
                gpus=inp.gpus_per_node, cpu=res.cpu if res else None, memory=res.memory if res else None
            ),
            read_claims=read,
            write_claims=write,
            service_account=service_account,
            restart_policy=restart_policy,
            restricted=restricted,
            read_only_root=restricted,
            hostname_subdomain=subdomain,
            termination_grace_seconds=checkpoint.grace_seconds(stage),
        ),
        inp.resolver,
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
    """The objects of one training stage (in creation order) and which of them is the workload: built by the
    stage's backend (:mod:`finetune_operator.backends`)."""
    from finetune_operator import backends

    name = job.spec.resolved_backend()
    try:
        backend = backends.get(name)
    except KeyError as exc:
        raise RenderError(str(exc.args[0])) from None
    return backend.build(
        StageInput(
            job=job,
            stage=stage,
            image=image,
            service_account=service_account,
            backoff_limit=backoff_limit,
            resolver=resolver,
        )
    )


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
