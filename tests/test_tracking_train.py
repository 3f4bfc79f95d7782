"""Experiment trackers for real on CPU: TensorBoard event files land with the stage's outputs, and W&B (its real
client, offline mode: no server here) records the run under the rendered name with the rendered settings."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from finetune_operator.worker import markers
from tests.test_local_run import lf_env
from tests.test_worker_resume import FTCTL, one_stage_job, prepare, tiny_model

__all__ = ["tiny_model"]

pytestmark = pytest.mark.train


def test_tensorboard_and_wandb_offline(tiny_model: Path, tmp_path: Path) -> None:
    doc = one_stage_job({"max_steps": 3, "save_steps": 100}, name="tracked")
    doc["spec"]["tracking"] = {
        "tensorboard": {},
        "wandb": {"project": "demo", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
    }
    cfg, out = prepare(tmp_path, tiny_model, doc)
    # What the training pod's environment holds (tracking.training_env), with the key a Secret would give.
    env = lf_env(
        WANDB_PROJECT="demo",
        WANDB_RUN_GROUP="tracked",
        WANDB_API_KEY="x" * 40,
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path / "wandb-dir"),
    )
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert markers.read_marker(out) is not None
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path / "wandb-dir")
    assert any(runs[0].rglob("*.wandb"))
