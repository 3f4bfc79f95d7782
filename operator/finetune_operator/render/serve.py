"""Serving with vLLM: the ONE place that decides what vLLM serves and with which command line.

:func:`vllm_command` turns the spec and the pipeline's outputs into vLLM's argv and environment. The
Deployment (:func:`deployment`) runs it as ``vllm serve <args>``; ``ftctl run --local`` runs the same args
with a resolver that maps the volumes to local folders. Modes:

``merged``
    merge is enabled: serve ``<out>/<job>/merged`` under ``servedModelName``.
``lora``
    merge is off and the pipeline ends with a LoRA adapter: serve the model the adapter was trained on
    (base, or the last full stage's output) as ``<servedModelName>-base`` and the adapter under
    ``servedModelName`` with ``--enable-lora --lora-modules <servedModelName>=<adapter dir>``. Clients asking
    for ``servedModelName`` get the fine-tuned model. vLLM applies one adapter per request, so stacked
    adapters (several LoRA stages) cannot be served without merging: :class:`RenderError`.
``full``
    the pipeline ends with a full/freeze stage: serve that stage's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from finetune_operator.api import constants as c
from finetune_operator.api.naming import service_name, short_hash
from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import RenderError
from finetune_operator.render import llamafactory as lf
from finetune_operator.render import paths
from finetune_operator.render.meta import COMPONENT_SERVE, metadata, selector_labels
from finetune_operator.render.plan import PathResolver
from finetune_operator.render.pods import HF_HOME, PodOptions, Resources, pod_template

ServeMode = Literal["merged", "lora", "full"]

#: Step name of serving (also the stage label of its objects).
SERVE = "serve"
#: vLLM accepts only these values for ``--max-lora-rank``.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: How long a pod may take to load the model before it is restarted: 30 minutes (a 70B model from network
#: storage takes 10-20).
STARTUP_SECONDS = 1800
PROBE_PERIOD = 10


@dataclass(frozen=True)
class VllmCommand:
    """What vLLM runs: ``<launcher> <args>``, e.g. ``vllm serve <args>``."""

    mode: ServeMode
    model: str
    """Folder vLLM loads (``--model``)."""
    served_model_name: str
    """Model name clients use for the fine-tuned model (the adapter's name in lora mode)."""
    args: tuple[str, ...]
    """Arguments after ``vllm serve`` (the model folder first)."""
    env: tuple[tuple[str, str], ...]
    """Environment variables (defaults first, then ``serve.env``; later names win)."""
    lora_modules: tuple[tuple[str, str], ...] = ()
    """(name, adapter folder) pairs served with ``--lora-modules``."""
    secret_env: tuple[tuple[str, str, str], ...] = ()
    """(variable, Secret, key): variables whose values come from Secrets (``valueFrom.secretKeyRef``), never
    written into any object. ``ftctl run --local`` takes them from its own environment."""


def max_lora_rank(job: FineTuneJob, ranks: tuple[int, ...]) -> int:
    """``serve.maxLoraRank``, else the smallest value vLLM accepts that fits every adapter's rank."""
    if job.spec.serve.max_lora_rank is not None:
        return job.spec.serve.max_lora_rank
    need = max(ranks, default=8)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise RenderError(f"LoRA rank {need} is larger than vLLM's maximum --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def served_model_name(job: FineTuneJob) -> str:
    """``serve.servedModelName``, else the FineTuneJob's name."""
    return job.spec.serve.served_model_name or job.name


#: vLLM reads its API key from this variable (``--api-key`` would put it on the command line, in the object).
API_KEY_ENV = "VLLM_API_KEY"

#: Variables that change what runs or what is loaded rather than how vLLM serves: refused in ``serve.env``.
LOADER_ENV: frozenset[str] = frozenset(
    {
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PYTHONINSPECT",
        "PATH",
    }
)


def _base_env() -> dict[str, str]:
    return {
        "HF_HOME": HF_HOME,
        # Everything is on local volumes; never reach out to the hub for a config or tokenizer.
        "HF_HUB_OFFLINE": "1",
        # Read-only root filesystem: vLLM/torch/triton caches under ~ land in the /tmp emptyDir, and
        # getpass.getuser() (torch inductor) must not need a passwd entry for the non-root UID.
        "HOME": "/tmp",
        "USER": "vllm",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


#: Variables the operator sets on the vLLM container (or owns, like the API key): ``serve.env`` may not set them.
OWNED_ENV: frozenset[str] = frozenset(_base_env()) | {API_KEY_ENV}


def _env(job: FineTuneJob) -> tuple[tuple[str, str], ...]:
    env = _base_env()
    for var in job.spec.serve.env:
        # Validation refuses owned and loader variables; skipping them here is the second line of defence.
        if var.value_from is None and var.name not in OWNED_ENV and var.name not in LOADER_ENV:
            env[var.name] = var.value
    return tuple(env.items())


def _secret_env(job: FineTuneJob) -> tuple[tuple[str, str, str], ...]:
    serve = job.spec.serve
    out = [
        (var.name, var.value_from.secret_key_ref.name, var.value_from.secret_key_ref.key)
        for var in serve.env
        if var.value_from is not None and var.name not in OWNED_ENV and var.name not in LOADER_ENV
    ]
    if serve.api_key_secret_ref is not None:
        out.append((API_KEY_ENV, serve.api_key_secret_ref.name, serve.api_key_secret_ref.key))
    return tuple(out)


def vllm_command(
    job: FineTuneJob,
    resolver: PathResolver | None = None,
    *,
    host: str = "0.0.0.0",
    port: int = c.VLLM_PORT,
    stage_chain: lf.Chain | None = None,
) -> VllmCommand:
    """vLLM's argv and environment for ``job``'s result (see the module docstring for the modes)."""
    res = resolver or PathResolver()
    ch = stage_chain or lf.chain(job, res)
    serve = job.spec.serve
    name = served_model_name(job)
    lora_modules: tuple[tuple[str, str], ...] = ()
    if job.spec.merge.enabled:
        mode: ServeMode = "merged"
        model = paths.merged_dir(job, res)
        base_name = name
    elif ch.adapters:
        if len(ch.adapters) > 1:
            raise RenderError(
                f"serving without merge: {len(ch.adapters)} stacked LoRA adapters cannot be served by vLLM "
                "(it applies one adapter per request); set spec.merge.enabled: true"
            )
        mode = "lora"
        model = ch.model
        base_name = f"{name}-base"
        lora_modules = ((name, ch.adapters[-1]),)
    else:
        mode = "full"
        model = ch.model
        base_name = name
    args: list[str] = [model, "--host", host, "--port", str(port), "--served-model-name", base_name]
    args += ["--tensor-parallel-size", str(serve.tensor_parallel_size)]
    if serve.max_model_len is not None:
        args += ["--max-model-len", str(serve.max_model_len)]
    if lora_modules:
        args += ["--enable-lora", "--lora-modules", *(f"{n}={d}" for n, d in lora_modules)]
        args += ["--max-lora-rank", str(max_lora_rank(job, ch.lora_ranks))]
    args += list(serve.args)
    return VllmCommand(
        mode=mode,
        model=model,
        served_model_name=name,
        args=tuple(args),
        env=_env(job),
        lora_modules=lora_modules,
        secret_env=_secret_env(job),
    )


def serve_name(job: FineTuneJob) -> str:
    """Name of the vLLM Deployment and Service."""
    return service_name(job.name, SERVE)


def endpoint(job: FineTuneJob) -> str:
    """The in-cluster OpenAI-compatible base URL."""
    return f"http://{serve_name(job)}.{job.namespace}.svc:{c.VLLM_PORT}/v1"


def _rollout_hash(job: FineTuneJob) -> str:
    """Hash of the spec minus fields that must not restart serving pods (replicas, suspend)."""
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec.pop("suspend", None)
    spec.get("serve", {}).pop("replicas", None)
    return short_hash(json.dumps(spec, sort_keys=True), 16)


def _probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def deployment(job: FineTuneJob, image: str, cmd: VllmCommand, resolver: PathResolver | None = None) -> dict[str, Any]:
    """The vLLM Deployment: OpenAI server on 8000, probes on /health, model volumes read-only.

    Rolling updates surge one pod and keep every old pod until the new one is ready (``maxUnavailable: 0``),
    so a re-run that produces a new model never leaves the endpoint without a ready server. The name is the
    job's, not the run's: a re-run (new ``spec.runId``) patches this Deployment's template to the new model
    folder (the rollout hash and the args change with it), and Kubernetes rolls the pods.
    """
    serve = job.spec.serve
    sres = serve.resources
    gpus = sres.gpus_per_node if sres is not None else 1
    read = [job.spec.output.volume.claim_name]
    if cmd.mode == "lora" or cmd.model == paths.model_dir(job, resolver or PathResolver()):
        read.append(job.spec.model.volume.claim_name)
    probes = {
        "startupProbe": _probe("/health", PROBE_PERIOD, STARTUP_SECONDS // PROBE_PERIOD, 5),
        "readinessProbe": _probe("/health", 5, 3, 5),
        "livenessProbe": _probe("/health", 15, 4, 10),
    }
    template = pod_template(
        job,
        PodOptions(
            component=COMPONENT_SERVE,
            stage=SERVE,
            image=image,
            command=["vllm", "serve"],
            args=list(cmd.args),
            env=[
                *({"name": k, "value": v} for k, v in cmd.env),
                *(
                    {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                    for k, secret, key in cmd.secret_env
                ),
            ],
            resources=Resources(gpus=gpus, cpu=sres.cpu if sres else None, memory=sres.memory if sres else None),
            read_claims=read,
            restart_policy="Always",
            container_name="vllm",
            ports=[{"name": "http", "containerPort": c.VLLM_PORT, "protocol": "TCP"}],
            probes=probes,
            mount_config=False,
        ),
        resolver,
    )
    template["metadata"]["annotations"] = {c.ANNOTATION_SPEC_HASH: _rollout_hash(job)}
    meta = metadata(job, serve_name(job), COMPONENT_SERVE, SERVE)
    if job.spec.run_id:
        # The Deployment outlives a run (same name, same Service, same endpoint); this records which run's
        # model it serves, so that the operator knows to roll it to the next run's template.
        meta["annotations"] = {c.ANNOTATION_RUN: job.spec.run_id}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": serve.replicas,
            "selector": {"matchLabels": selector_labels(job, COMPONENT_SERVE, SERVE)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def service(job: FineTuneJob) -> dict[str, Any]:
    """ClusterIP Service in front of the vLLM pods, port 8000."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, serve_name(job), COMPONENT_SERVE, SERVE),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(job, COMPONENT_SERVE, SERVE),
            "ports": [{"name": "http", "port": c.VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


__all__ = [
    "API_KEY_ENV",
    "LOADER_ENV",
    "OWNED_ENV",
    "SERVE",
    "VllmCommand",
    "deployment",
    "endpoint",
    "max_lora_rank",
    "serve_name",
    "served_model_name",
    "service",
    "vllm_command",
]
