"""The pod template every workload shares, and the worker command line.

One function builds every pod so that the rules hold everywhere at once:

* each PersistentVolumeClaim is mounted once at ``/mnt/volumes/<claimName>``, read-only unless the pod writes
  to it (training reads model and data, writes outputs; download writes the model; serve only reads);
* the generated configs (ConfigMap) at ``/etc/finetune`` read-only; emptyDirs for ``/tmp``, ``HF_HOME`` and
  ``/dev/shm`` (``medium: Memory``: NCCL and PyTorch dataloaders need more than the container runtime's 64 MiB);
* Pod Security "restricted" where the workload allows it (non-root UID, no privilege escalation, all
  capabilities dropped, RuntimeDefault seccomp, read-only root filesystem);
* ``automountServiceAccountToken: false`` except for pods that report progress: those run as the
  ``finetune-worker`` ServiceAccount, whose Role can only patch ``finetunejobs/status``;
* the scheduling fields of ``spec.scheduling`` merged with the step's own (:mod:`.scheduling`), and the
  standard labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from finetune_operator.api.checkpointing import DEFAULT_GRACE_SECONDS
from finetune_operator.api.naming import child_name, config_map_name, is_dns_label, short_hash
from finetune_operator.api.types import FineTuneJob
from finetune_operator.render import scheduling
from finetune_operator.render.meta import labels, run_scope
from finetune_operator.render.plan import CONFIG_DIR, PathResolver

#: UID/GID of the worker image's unprivileged user (images/Dockerfile: 65532, the distroless "nonroot" id);
#: ``fsGroup`` makes PVCs writable for it. A high UID cannot collide with a host account.
RUN_AS_USER = 65532
#: HF_HOME inside pods: an emptyDir (the root filesystem is read-only).
HF_HOME = "/tmp/hf-home"
#: Name of the main container of every workload (the Job podFailurePolicy refers to it).
WORKER_CONTAINER = "worker"
#: Exit codes of worker errors a retry cannot fix (bad data, model missing): see finetune_operator.errors.
NON_RETRYABLE_EXIT_CODES: tuple[int, ...] = (3, 4, 12)

WorkerStep = Literal["download", "preflight", "train", "merge", "eval", "publish"]


def worker_command(step: WorkerStep, stage: str | None = None, *, config_dir: str = CONFIG_DIR) -> list[str]:
    """The argv of a worker container: ``ftctl worker <step> --config <config_dir>/<name>.yaml``.

    ``<name>`` is the stage for ``train``, ``download`` for the download step and ``merge`` for the merge;
    the preflight step reads ``preflight.json`` (the FineTuneJob it plans).
    Everything else the worker needs comes from the config file and the ``FT_*`` environment variables
    (:func:`worker_env`), so that the same argv works under every backend.
    """
    name = stage if step == "train" else step
    if not name:
        raise ValueError("worker_command('train') needs the stage name")
    ext = "json" if step == "preflight" else "yaml"
    return ["ftctl", "worker", step, "--config", f"{config_dir.rstrip('/')}/{name}.{ext}"]


def worker_env(
    job: FineTuneJob,
    stage: str,
    backend: str,
    *,
    nproc_per_node: int = 1,
    offline: bool = True,
    redirect_home: bool = True,
) -> list[dict[str, Any]]:
    """The ``FT_*`` and Hugging Face variables of worker containers (never a secret: see download).

    ``redirect_home`` points ``HOME`` at the ``/tmp`` emptyDir for read-only root filesystems. T9k's
    DeepSpeedJob pods keep their real home: the DeepSpeed launcher reads ``~/.deepspeed_env`` (written there
    by T9k to forward the pod's environment to every rank) through ``HOME``.
    """
    env: list[dict[str, Any]] = [
        {"name": "FT_JOB_NAME", "value": job.name},
        {"name": "FT_JOB_NAMESPACE", "value": job.namespace},
        {"name": "FT_STAGE", "value": stage},
        {"name": "FT_BACKEND", "value": backend},
        {"name": "FT_NPROC_PER_NODE", "value": str(nproc_per_node)},
        {"name": "FT_CONFIG_DIR", "value": CONFIG_DIR},
        {"name": "HF_HOME", "value": HF_HOME},
    ]
    if redirect_home:
        # The root filesystem is read-only: caches of torch/triton/matplotlib go to the /tmp emptyDir, and
        # getpass.getuser() (torch inductor, triton) must not need a passwd entry for the non-root UID.
        env += [{"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": "finetune"}]
    if offline:
        # Training and merging read local folders only; a hub lookup would hang or leak on air-gapped nodes.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def volume_name(claim: str) -> str:
    """A DNS-label volume name for a claim (claims may contain dots and be 253 characters long)."""
    candidate = f"pvc-{claim}"
    if is_dns_label(candidate):
        return candidate
    cleaned = re.sub(r"[^a-z0-9-]+", "-", claim.lower()).strip("-")[:40].strip("-")
    return child_name("pvc", cleaned, short_hash(claim))


@dataclass(frozen=True)
class Resources:
    """Size of one container."""

    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None

    def to_k8s(self) -> dict[str, Any]:
        """requests == limits for cpu/memory (Guaranteed QoS when both are set); GPUs only as limits."""
        limits: dict[str, Any] = {}
        requests: dict[str, Any] = {}
        if self.cpu:
            limits["cpu"] = requests["cpu"] = self.cpu
        if self.memory:
            limits["memory"] = requests["memory"] = self.memory
        if self.gpus > 0:
            limits["nvidia.com/gpu"] = self.gpus
        out: dict[str, Any] = {}
        if limits:
            out["limits"] = limits
        if requests:
            out["requests"] = requests
        return out


def claim_mounts(
    resolver: PathResolver, read: Sequence[str], write: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for claims: each claim once, writable if it appears in ``write``."""
    claims = sorted(set(read) | set(write))
    volumes = [{"name": volume_name(c), "persistentVolumeClaim": {"claimName": c}} for c in claims]
    mounts = [{"name": volume_name(c), "mountPath": resolver.claim_dir(c), "readOnly": c not in write} for c in claims]
    return volumes, mounts


def restricted_container_context(read_only_root: bool = True) -> dict[str, Any]:
    """Container securityContext satisfying Pod Security "restricted"."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_context() -> dict[str, Any]:
    """Pod securityContext: non-root UID/GID, fsGroup for writable PVCs, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        # Recursive chown of a 100 GB model volume on every pod start would take minutes.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


@dataclass(frozen=True)
class PodOptions:
    """Everything that varies between the pods of the pipeline."""

    component: str
    stage: str
    image: str
    command: Sequence[str] | None = None
    args: Sequence[str] | None = None
    env: Sequence[Mapping[str, Any]] = ()
    resources: Resources = Resources()
    read_claims: Sequence[str] = ()
    write_claims: Sequence[str] = ()
    #: ServiceAccount for pods that call the API (progress); None: no token mounted.
    service_account: str | None = None
    restart_policy: str = "Never"
    #: Pod Security "restricted" (False only where the workload cannot run so: T9k's sshd-based launcher).
    restricted: bool = True
    read_only_root: bool = True
    container_name: str = WORKER_CONTAINER
    ports: Sequence[Mapping[str, Any]] = ()
    probes: Mapping[str, Any] | None = None
    mount_config: bool = True
    extra_labels: Mapping[str, str] | None = None
    hostname_subdomain: str | None = None
    termination_grace_seconds: int = DEFAULT_GRACE_SECONDS


def pod_template(job: FineTuneJob, opts: PodOptions, resolver: PathResolver | None = None) -> dict[str, Any]:
    """A PodTemplateSpec (metadata + spec) following the rules in the module docstring."""
    res = resolver or PathResolver()
    volumes, mounts = claim_mounts(res, opts.read_claims, opts.write_claims)
    if opts.mount_config:
        volumes.append({"name": "config", "configMap": {"name": config_map_name(run_scope(job))}})
        mounts.append({"name": "config", "mountPath": res.config_dir, "readOnly": True})
    volumes += [
        {"name": "tmp", "emptyDir": {}},
        {"name": "hf-home", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts += [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "hf-home", "mountPath": HF_HOME},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    container: dict[str, Any] = {
        "name": opts.container_name,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [dict(e) for e in opts.env],
        "volumeMounts": mounts,
        "resources": opts.resources.to_k8s(),
    }
    if opts.command is not None:
        container["command"] = list(opts.command)
    if opts.args is not None:
        container["args"] = list(opts.args)
    if opts.ports:
        container["ports"] = [dict(p) for p in opts.ports]
    if opts.probes:
        container.update(opts.probes)
    if opts.restricted:
        container["securityContext"] = restricted_container_context(opts.read_only_root)
    else:
        container["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}}
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": opts.restart_policy,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": opts.termination_grace_seconds,
    }
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
        spec["automountServiceAccountToken"] = True
    else:
        spec["automountServiceAccountToken"] = False
    if opts.restricted:
        spec["securityContext"] = restricted_pod_context()
    if opts.hostname_subdomain:
        spec["subdomain"] = opts.hostname_subdomain
    spec.update(scheduling.pod_fields(job, opts.component, opts.stage, uses_gpu=opts.resources.gpus > 0))
    lbl = labels(job, opts.component, opts.stage)
    if opts.extra_labels:
        lbl.update(opts.extra_labels)
    return {"metadata": {"labels": lbl}, "spec": spec}
