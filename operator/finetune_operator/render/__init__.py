"""The pure renderer: one FineTuneJob in, an ordered :class:`Plan` of Kubernetes objects out.

``render(job)`` never talks to a cluster and never imports kopf, a Kubernetes client or torch; the operator,
``ftctl render`` (GitOps) and ``ftctl run --local`` all start from its output, so what is rendered offline is
exactly what the operator creates. The same input gives byte-identical output.

Plan layout::

    shared:   ConfigMap <job>-config   (<stage>.yaml per stage, merge.yaml, download.yaml,
                                        dataset_info.json, ds_<stage>.json), mounted at /etc/finetune
    steps:    download   Job                       (only when model.source is set)
              preflight  Job (CPU only)            (unless spec.preflight.mode is Disabled)
                         (the first of the two first resolves every Secret key of the plan: .secretcheck)
              <stage>... Job | Indexed Job + headless Service | PyTorchJob | DeepSpeedJob | TrainJob
              merge      Job                       (merge.enabled)
              eval       Job  (ftctl worker eval)  (spec.evaluate; the promotion gate reads its metrics)
              publish    Job  (ftctl worker publish, credentials as secretKeyRef)  (spec.publish)
              serve      Deployment + Service      (serve.enabled)

Modules: :mod:`.llamafactory` (LLaMA-Factory configs and stage chaining), :mod:`.deepspeed` (ZeRO JSON),
:mod:`.pods` (the common pod template, worker argv), :mod:`.workloads` (download/merge Jobs, the dispatch to
:mod:`finetune_operator.backends`, :func:`suspend_path`), :mod:`.serve` (the vLLM command line, Deployment,
Service), :mod:`.paths` (output layout).
The spec is assumed valid (:func:`finetune_operator.validation.validate`); cases that no valid spec should
reach raise :class:`~finetune_operator.errors.RenderError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.naming import config_map_name
from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import RenderError
from finetune_operator.render import evaluation, identity, paths, secretcheck, serve, workloads
from finetune_operator.render import llamafactory as lf
from finetune_operator.render.deepspeed import deepspeed_config
from finetune_operator.render.dump import to_json, to_yaml, to_yaml_documents
from finetune_operator.render.meta import COMPONENT_CONFIG, metadata, run_scope
from finetune_operator.render.plan import CONFIG_DIR, VOLUME_ROOT, PathResolver, Plan, Step, StepKind
from finetune_operator.render.pods import worker_command
from finetune_operator.render.serve import VllmCommand, vllm_command
from finetune_operator.render.workloads import suspend_path

#: Step names the pipeline uses itself; training stages may not take them (their config files, output folders
#: and child objects would collide). Validation rejects the same set (validation.RESERVED_STAGE_NAMES).
RESERVED_STAGE_NAMES: frozenset[str] = frozenset(
    {
        workloads.DOWNLOAD,
        workloads.PREFLIGHT,
        workloads.MERGE,
        serve.SERVE,
        paths.MERGED_DIR,
        evaluation.EVAL,
        evaluation.PUBLISH,
    }
)


@dataclass(frozen=True)
class RenderOptions:
    """Install-level settings the spec does not carry."""

    worker_image: str = c.DEFAULT_WORKER_IMAGE
    """Worker image when ``spec.image`` is not set."""
    vllm_image: str = c.DEFAULT_VLLM_IMAGE
    """vLLM image when ``spec.serve.image`` is not set."""
    worker_service_account: str = ""
    """A shared ServiceAccount for progress-reporting training pods; empty (the default): each FineTuneJob
    gets its own, allowed to patch only its own status (see :mod:`.identity`)."""
    resolver: PathResolver = field(default_factory=PathResolver)
    """Where volumes and configs are; the default is the in-pod layout (``/mnt/volumes``, ``/etc/finetune``)."""
    backoff_limit: int | None = None
    """Pod-level retries of each workload; ``spec.retries`` when None. An operator that re-creates failed
    workloads itself passes 0 so that retries are not multiplied."""


def config_files(
    job: FineTuneJob, resolver: PathResolver | None = None, *, worker_image: str | None = None
) -> dict[str, str]:
    """Every generated file by name (the ConfigMap's ``data``): what ``/etc/finetune`` contains."""
    res = resolver or PathResolver()
    ch = lf.chain(job, res)
    files: dict[str, str] = {"dataset_info.json": to_json(lf.dataset_info(job, res))}
    if job.spec.model.source:
        files["download.yaml"] = to_yaml(workloads.download_config(job, res))
    if workloads.preflight_enabled(job):
        files["preflight.json"] = to_json(workloads.preflight_config(job))
    for stage in job.spec.stages:
        files[f"{stage.name}.yaml"] = to_yaml(lf.train_config(job, stage.name, res, stage_chain=ch))
        if stage.deepspeed is not None:
            files[f"ds_{stage.name}.json"] = to_json(deepspeed_config(stage.deepspeed))
    if job.spec.merge.enabled:
        files["merge.yaml"] = to_yaml(lf.export_config(job, res, stage_chain=ch))
    image = job.spec.image or worker_image or c.DEFAULT_WORKER_IMAGE
    for name, cfg in evaluation.config_files(job, res, ch, worker_image=image).items():
        files[name] = to_yaml(cfg)
    return dict(sorted(files.items()))


def _check(job: FineTuneJob) -> None:
    for stage in job.spec.stages:
        if stage.name in RESERVED_STAGE_NAMES:
            raise RenderError(f"stage name {stage.name!r} is reserved ({', '.join(sorted(RESERVED_STAGE_NAMES))})")
    known = {d.name for d in job.spec.datasets}
    for stage in job.spec.stages:
        for ds in stage.datasets:
            if ds not in known:
                raise RenderError(f"stage {stage.name!r} uses undeclared dataset {ds!r}")


def render(job: FineTuneJob, options: RenderOptions | None = None) -> Plan:
    """Render the whole pipeline of ``job`` (see the module docstring)."""
    opts = options or RenderOptions()
    res = opts.resolver
    _check(job)
    ch = lf.chain(job, res)
    worker_image = job.spec.image or opts.worker_image
    backoff = job.spec.retries if opts.backoff_limit is None else opts.backoff_limit

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, config_map_name(run_scope(job)), COMPONENT_CONFIG, "shared"),
        "data": config_files(job, res, worker_image=worker_image),
    }

    steps: list[Step] = []

    def add(
        name: str, kind: StepKind, type_: str, objs: list[dict[str, Any]], wl: dict[str, Any], out: str | None
    ) -> None:
        steps.append(Step(name=name, kind=kind, type=type_, objects=tuple(objs), workload=wl, output_path=out))

    if job.spec.model.source:
        wl = workloads.download_job(job, worker_image, backoff, res)
        add(workloads.DOWNLOAD, "download", "download", [wl], wl, paths.model_dir(job, res))
    if workloads.preflight_enabled(job):
        wl = workloads.preflight_job(
            job, worker_image, opts.worker_service_account or identity.worker_identity_name(job), res
        )
        add(workloads.PREFLIGHT, "preflight", "preflight", [wl], wl, None)
    for stage in job.spec.stages:
        objs, wl = workloads.train_objects(
            job,
            stage,
            image=worker_image,
            service_account=opts.worker_service_account or identity.worker_identity_name(job),
            backoff_limit=backoff,
            resolver=res,
        )
        add(stage.name, "train", stage.type, objs, wl, ch.stages[stage.name].output_dir)
    merged = job.spec.merge.enabled
    if merged:
        wl = workloads.merge_job(job, worker_image, backoff, res)
        add(workloads.MERGE, "merge", "merge", [wl], wl, paths.merged_dir(job, res))
    if job.spec.evaluate is not None:
        wl = evaluation.eval_job(job, worker_image, backoff, res)
        add(evaluation.EVAL, "eval", "eval", [wl], wl, evaluation.eval_dir(job, res))
    if job.spec.publish is not None:
        wl = evaluation.publish_job(job, worker_image, backoff, res)
        add(evaluation.PUBLISH, "publish", "publish", [wl], wl, None)

    outputs: dict[str, Any] = {"adapters": list(ch.adapters)}
    if merged:
        outputs["model"] = outputs["mergedModel"] = paths.merged_dir(job, res)
    elif not ch.adapters and ch.model != paths.model_dir(job, res):
        outputs["model"] = ch.model
    if job.spec.evaluate is not None or job.spec.publish is not None:
        outputs["lineage"] = f"{evaluation.published_dir(job, res, ch)}/finetune-lineage.json"
    if job.spec.evaluate is not None and job.spec.evaluate.generation:
        outputs["predictions"] = f"{evaluation.eval_dir(job, res)}/predict/generated_predictions.jsonl"
    if job.spec.serve.enabled:
        cmd = vllm_command(job, res, stage_chain=ch)
        dep = serve.deployment(job, job.spec.serve.image or opts.vllm_image, cmd, res)
        add(serve.SERVE, "serve", "serve", [dep, serve.service(job)], dep, None)
        outputs["endpoint"] = serve.endpoint(job)
        outputs["servedModelName"] = cmd.served_model_name
    own_identity = [] if opts.worker_service_account else identity.worker_identity(job)
    return Plan(shared=(config_map, *own_identity), steps=tuple(_check_secrets_first(steps)), outputs=outputs)


def _check_secrets_first(steps: list[Step]) -> list[Step]:
    """The first download or preflight Job resolves every Secret key of the plan first (:mod:`.secretcheck`)."""
    refs = secretcheck.referenced(obj for step in steps for obj in step.objects)
    for i, step in enumerate(steps):
        if step.kind in ("download", "preflight"):
            # Keys the Job's own pod uses are resolved by the kubelet for it anyway.
            own = set(secretcheck.referenced([step.workload]))
            others = [r for r in refs if r not in own]
            if others:
                wl = secretcheck.with_check(step.workload, others)
                objects = tuple(wl if obj is step.workload else obj for obj in step.objects)
                steps[i] = dataclasses.replace(step, objects=objects, workload=wl)
            break
    return steps


def render_yaml(job: FineTuneJob, options: RenderOptions | None = None) -> str:
    """All objects of the plan as one multi-document YAML stream (creation order)."""
    return to_yaml_documents(render(job, options).objects())


__all__ = [
    "CONFIG_DIR",
    "VOLUME_ROOT",
    "PathResolver",
    "Plan",
    "RenderError",
    "RenderOptions",
    "Step",
    "VllmCommand",
    "config_files",
    "render",
    "render_yaml",
    "suspend_path",
    "vllm_command",
    "worker_command",
]
