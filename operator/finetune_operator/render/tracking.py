"""Experiment trackers: ``spec.tracking`` into each training config (``report_to``) and training pod (env).

Why env and not config: the credentials are Secrets and configs live in a ConfigMap. Each credential is an
``env.valueFrom.secretKeyRef`` of the training pods only (download, merge and serve never see it); the other
settings (project, server URL, experiment) are plain variables the trackers' own clients read
(``WANDB_*``, ``MLFLOW_*``). TensorBoard writes under ``<stage output>/runs/`` (the Trainer's default, next to
the adapter on the output volume; transformers 5 no longer reads ``logging_dir``).
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.types import FineTuneJob, SecretKeyRef, TrackingSpec

#: ``report_to`` names, in the order they are written.
TRACKERS = ("tensorboard", "wandb", "mlflow")
#: Where the Trainer writes TensorBoard event files, under each stage's output folder.
TENSORBOARD_DIR = "runs"


def report_to(tracking: TrackingSpec) -> list[str]:
    """The trackers the spec enables, as LLaMA-Factory's ``report_to`` list (``["none"]`` when none)."""
    on = {
        "tensorboard": tracking.tensorboard is not None and tracking.tensorboard.enabled,
        "wandb": tracking.wandb is not None,
        "mlflow": tracking.mlflow is not None,
    }
    return [t for t in TRACKERS if on[t]] or ["none"]


def train_args(job: FineTuneJob, stage: str) -> dict[str, Any]:
    """Training-config keys for ``spec.tracking`` (empty without the block: the default ``report_to: none``)."""
    tracking = job.spec.tracking
    if tracking is None:
        return {}
    targets = report_to(tracking)
    out: dict[str, Any] = {"report_to": targets if len(targets) > 1 else targets[0]}
    if targets != ["none"]:
        out["run_name"] = f"{job.name}-{job.spec.run_id}-{stage}" if job.spec.run_id else f"{job.name}-{stage}"
    return out


def _secret(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def training_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """Environment of training pods for the trackers (credentials by ``secretKeyRef`` only)."""
    tracking = job.spec.tracking
    if tracking is None:
        return []
    env: list[dict[str, Any]] = []
    if tracking.wandb is not None:
        wb = tracking.wandb
        env.append({"name": "WANDB_PROJECT", "value": wb.project})
        if wb.entity:
            env.append({"name": "WANDB_ENTITY", "value": wb.entity})
        if wb.host:
            env.append({"name": "WANDB_BASE_URL", "value": wb.host})
        env.append({"name": "WANDB_RUN_GROUP", "value": job.name})
        env.append(_secret("WANDB_API_KEY", wb.api_key_secret_ref))
    if tracking.mlflow is not None:
        ml = tracking.mlflow
        env.append({"name": "MLFLOW_TRACKING_URI", "value": ml.tracking_uri})
        if ml.experiment:
            env.append({"name": "MLFLOW_EXPERIMENT_NAME", "value": ml.experiment})
        for var, ref in (
            ("MLFLOW_TRACKING_TOKEN", ml.token_secret_ref),
            ("MLFLOW_TRACKING_USERNAME", ml.username_secret_ref),
            ("MLFLOW_TRACKING_PASSWORD", ml.password_secret_ref),
        ):
            if ref is not None:
                env.append(_secret(var, ref))
    return env
