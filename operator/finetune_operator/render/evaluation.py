"""Evaluation, lineage and publishing configs, and the Jobs that run them (pure, like the rest of render).

Evaluation (``eval.yaml``, run by ``ftctl worker eval``) is a list of LLaMA-Factory runs on the candidate
(the merged model, or the final model + its adapters when merge is off):

* ``loss``: ``llamafactory-cli train`` with ``do_train: false, do_eval: true`` on the held-out datasets
  (LLaMA-Factory's ``eval_loss``);
* ``predict``: ``do_predict: true, predict_with_generate: true`` (BLEU-4 and ROUGE as LLaMA-Factory computes
  them, and ``generated_predictions.jsonl``);
* ``benchmark``: LLaMA-Factory's multiple-choice evaluator on a task folder in its eval format.

Each run writes under ``<out>/<job>[/<runId>]/eval/<run>/``; the worker folds the metrics into
``eval/metrics.json``. Publishing (``publish.yaml``) names the model folder, the destinations and the
environment variables holding each credential; the credentials themselves only reach the publish pod as
``secretKeyRef`` environment variables. Both configs carry the ``lineage`` block (what the spec knows:
hashes of the spec, the stages' key hyper-parameters, images), completed by the worker.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from finetune_operator.api.naming import workload_name
from finetune_operator.api.types import ADAPTER_METHODS, FineTuneJob, SecretKeyRef
from finetune_operator.render import llamafactory as lf
from finetune_operator.render import paths
from finetune_operator.render.meta import run_scope
from finetune_operator.render.plan import PathResolver
from finetune_operator.render.pods import PodOptions, Resources, pod_template, worker_command, worker_env

EVAL = "eval"
PUBLISH = "publish"
COMPONENT_EVAL = "eval"
COMPONENT_PUBLISH = "publish"
METRICS_FILE = "metrics.json"
PUBLISH_RESULT_FILE = "publish-result.json"
#: Hyper-parameters of a stage worth keeping in the lineage (when set in its args).
KEY_HYPERPARAMETERS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cutoff_len",
    "lr_scheduler_type",
    "warmup_ratio",
    "pref_beta",
    "pref_loss",
    "bf16",
    "fp16",
    "seed",
)


def eval_dir(job: FineTuneJob, resolver: PathResolver) -> str:
    """``<out>/<job>[/<runId>]/eval``: metrics and predictions of the evaluation."""
    return f"{paths.run_output_dir(job, resolver)}/{EVAL}"


def candidate(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain) -> tuple[str, tuple[str, ...]]:
    """(model, adapters) of the model the pipeline produced: what is evaluated, served and published."""
    if job.spec.merge.enabled:
        return paths.merged_dir(job, resolver), ()
    return ch.model, ch.adapters


def artifact(job: FineTuneJob) -> str:
    """``merged`` or ``adapters`` (``spec.publish.artifact``, defaulting from ``merge.enabled``)."""
    chosen = job.spec.publish.artifact if job.spec.publish is not None else None
    return chosen or ("merged" if job.spec.merge.enabled else "adapters")


def published_dir(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain) -> str:
    """The folder that is published and that gets ``finetune-lineage.json``."""
    if artifact(job) == "merged":
        return paths.merged_dir(job, resolver)
    return ch.adapters[-1] if ch.adapters else ch.model


def _model_args(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain) -> dict[str, Any]:
    model, adapters = candidate(job, resolver, ch)
    out: dict[str, Any] = {"model_name_or_path": model, "template": job.spec.model.template}
    if adapters:
        out["adapter_name_or_path"] = ",".join(adapters)
        out["finetuning_type"] = "lora"
        if job.spec.stages[-1].method == "qlora":
            out["quantization_bit"] = lf.QLORA_BITS
    else:
        out["finetuning_type"] = "full"
    return out


def eval_runs(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain) -> dict[str, dict[str, Any]]:
    """LLaMA-Factory config of each evaluation run, by run name (``loss``, ``predict``, ``benchmark``)."""
    ev = job.spec.evaluate
    if ev is None:
        return {}
    base = eval_dir(job, resolver)
    model = _model_args(job, resolver, ch)
    runs: dict[str, dict[str, Any]] = {}
    extra = {k: v for k, v in ev.args.items() if k not in lf.OWNED_TRAIN_KEYS}
    common: dict[str, Any] = {
        "report_to": "none",
        "per_device_eval_batch_size": 1,
        **extra,
        **model,
        "stage": "sft",
        "do_train": False,
        "eval_dataset": ",".join(ev.datasets),
        "dataset_dir": resolver.config_dir,
    }
    if ev.max_samples is not None:
        common["max_samples"] = ev.max_samples
    if ev.datasets and ev.loss:
        runs["loss"] = {**common, "do_eval": True, "output_dir": f"{base}/loss"}
    if ev.datasets and ev.generation:
        runs["predict"] = {**common, "do_predict": True, "predict_with_generate": True, "output_dir": f"{base}/predict"}
    if ev.benchmark is not None:
        bench = ev.benchmark
        runs["benchmark"] = {
            **model,
            "task": bench.task,
            "task_dir": resolver.path(bench.volume),
            "lang": bench.lang,
            "n_shot": bench.n_shot,
            "save_dir": f"{base}/benchmark",
        }
    return runs


def spec_hash(job: FineTuneJob) -> str:
    """SHA-256 of the spec in canonical JSON: the identity of "what was asked for"."""
    data = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lineage_config(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain, *, worker_image: str) -> dict[str, Any]:
    """The static part of ``finetune-lineage.json`` (see :mod:`finetune_operator.worker.lineage`)."""
    model = job.spec.model
    stages = []
    for stage in job.spec.stages:
        hyper = {k: stage.args[k] for k in KEY_HYPERPARAMETERS if k in stage.args}
        if stage.method in ADAPTER_METHODS:
            hyper["lora_rank"] = stage.lora.rank if stage.lora is not None else 8
        stages.append(
            {
                "name": stage.name,
                "type": stage.type,
                "method": stage.method,
                "datasets": list(stage.datasets),
                "hyperparameters": hyper,
                "outputDir": paths.stage_output_dir(job, stage.name, resolver),
            }
        )
    return {
        "job": {"name": job.name, "namespace": job.namespace},
        "runId": job.spec.run_id,
        "specHash": spec_hash(job),
        "baseModel": {
            "source": model.source,
            "hub": model.hub if model.source else None,
            "revision": model.revision,
            "path": paths.model_dir(job, resolver),
        },
        "datasets": [{"name": d.name, "path": resolver.path(d.volume)} for d in job.spec.datasets],
        "stages": stages,
        "artifact": artifact(job),
        "images": {"worker": worker_image},
    }


def eval_config(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain, *, worker_image: str) -> dict[str, Any]:
    """``eval.yaml``: the runs, where metrics go, and the lineage to write next to the model."""
    base = eval_dir(job, resolver)
    return {
        "outputDir": base,
        "metricsFile": f"{base}/{METRICS_FILE}",
        "runs": eval_runs(job, resolver, ch),
        "modelDir": published_dir(job, resolver, ch),
        "lineage": lineage_config(job, resolver, ch, worker_image=worker_image),
    }


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": False}}}


def publish_destinations(job: FineTuneJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(destinations of ``publish.yaml``, the env vars carrying their credentials as ``secretKeyRef``)."""
    pub = job.spec.publish
    if pub is None:
        return [], []
    dests: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []
    for i, d in enumerate(pub.destinations):
        prefix = f"FT_PUBLISH_{i}"
        if d.huggingface is not None:
            h = d.huggingface
            dest: dict[str, Any] = {
                "type": "huggingface",
                "repoId": h.repo_id,
                "private": h.private,
                "revision": h.revision,
                "tokenEnv": f"{prefix}_TOKEN",
            }
            if h.endpoint:
                dest["endpoint"] = h.endpoint
            env.append(_secret_env(f"{prefix}_TOKEN", h.token_secret_ref))
        elif d.s3 is not None:
            s = d.s3
            dest = {"type": "s3", "bucket": s.bucket, "prefix": s.prefix}
            if s.endpoint_url:
                dest["endpointUrl"] = s.endpoint_url
            if s.region:
                dest["region"] = s.region
            if s.access_key_id_secret_ref is not None and s.secret_access_key_secret_ref is not None:
                dest["accessKeyIdEnv"] = f"{prefix}_ACCESS_KEY_ID"
                dest["secretAccessKeyEnv"] = f"{prefix}_SECRET_ACCESS_KEY"
                env.append(_secret_env(f"{prefix}_ACCESS_KEY_ID", s.access_key_id_secret_ref))
                env.append(_secret_env(f"{prefix}_SECRET_ACCESS_KEY", s.secret_access_key_secret_ref))
        else:
            o = d.oci
            assert o is not None  # validation: exactly one destination type
            dest = {
                "type": "oci",
                "reference": o.reference,
                "insecure": o.insecure,
                "artifact": artifact(job),
                "annotations": {
                    "org.opencontainers.image.title": job.name,
                    **({"dev.finetune.run-id": job.spec.run_id} if job.spec.run_id else {}),
                },
            }
            if o.username_secret_ref is not None and o.password_secret_ref is not None:
                dest["usernameEnv"] = f"{prefix}_USERNAME"
                dest["passwordEnv"] = f"{prefix}_PASSWORD"
                env.append(_secret_env(f"{prefix}_USERNAME", o.username_secret_ref))
                env.append(_secret_env(f"{prefix}_PASSWORD", o.password_secret_ref))
        dests.append({"name": d.name, **dest})
    return dests, env


def publish_config(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain, *, worker_image: str) -> dict[str, Any]:
    """``publish.yaml``: the folder, the lineage, the destinations (credentials by env var name only)."""
    dests, _ = publish_destinations(job)
    cfg: dict[str, Any] = {
        "modelDir": published_dir(job, resolver, ch),
        "artifact": artifact(job),
        "lineage": lineage_config(job, resolver, ch, worker_image=worker_image),
        "resultFile": f"{paths.run_output_dir(job, resolver)}/{PUBLISH}/{PUBLISH_RESULT_FILE}",
        "destinations": dests,
    }
    if job.spec.evaluate is not None:
        cfg["metricsFile"] = f"{eval_dir(job, resolver)}/{METRICS_FILE}"
    return cfg


def config_files(job: FineTuneJob, resolver: PathResolver, ch: lf.Chain, *, worker_image: str) -> dict[str, Any]:
    """``eval.yaml`` and ``publish.yaml`` as dicts (when the spec asks for them)."""
    out: dict[str, Any] = {}
    if job.spec.evaluate is not None:
        out["eval.yaml"] = eval_config(job, resolver, ch, worker_image=worker_image)
    if job.spec.publish is not None:
        out["publish.yaml"] = publish_config(job, resolver, ch, worker_image=worker_image)
    return out


def _claims(job: FineTuneJob) -> tuple[list[str], list[str]]:
    read = {job.spec.model.volume.claim_name, *(d.volume.claim_name for d in job.spec.datasets)}
    ev = job.spec.evaluate
    if ev is not None and ev.benchmark is not None:
        read.add(ev.benchmark.volume.claim_name)
    write = job.spec.output.volume.claim_name
    return sorted(read - {write}), [write]


def _job(
    job: FineTuneJob,
    step: str,
    image: str,
    backoff_limit: int,
    resolver: PathResolver,
    env: list[dict[str, Any]],
    gpus: int,
    spec_resources: Any,
) -> dict[str, Any]:
    from finetune_operator.render.workloads import batch_job

    read, write = _claims(job)
    component = COMPONENT_EVAL if step == EVAL else COMPONENT_PUBLISH
    tpl = pod_template(
        job,
        PodOptions(
            component=component,
            stage=step,
            image=image,
            command=worker_command("eval" if step == EVAL else "publish", config_dir=resolver.config_dir),
            env=env,
            resources=Resources(
                gpus=gpus,
                cpu=spec_resources.cpu if spec_resources else None,
                memory=spec_resources.memory if spec_resources else None,
            ),
            read_claims=read,
            write_claims=write,
        ),
        resolver,
    )
    return batch_job(job, workload_name(run_scope(job), step), component, step, tpl, backoff_limit=backoff_limit)


def eval_job(job: FineTuneJob, image: str, backoff_limit: int, resolver: PathResolver) -> dict[str, Any]:
    """The Job running ``ftctl worker eval`` (one pod, GPUs as configured: generation wants one)."""
    res = job.spec.evaluate.resources if job.spec.evaluate is not None else None
    gpus = res.gpus_per_node if res is not None else 1
    return _job(job, EVAL, image, backoff_limit, resolver, worker_env(job, EVAL, "job"), gpus, res)


def publish_job(job: FineTuneJob, image: str, backoff_limit: int, resolver: PathResolver) -> dict[str, Any]:
    """The Job running ``ftctl worker publish``: online, no GPU, credentials as ``secretKeyRef`` only."""
    res = job.spec.publish.resources if job.spec.publish is not None else None
    _, secret_env = publish_destinations(job)
    env = worker_env(job, PUBLISH, "job", offline=False) + secret_env
    return _job(job, PUBLISH, image, backoff_limit, resolver, env, 0, res)
