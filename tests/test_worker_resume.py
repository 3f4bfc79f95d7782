"""Preemption: SIGTERM after the first checkpoint stops training cleanly, and the next run resumes from that
checkpoint (not from step 0); a finished stage re-run is a no-op. Real LLaMA-Factory on CPU."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.local import demo
from finetune_operator.local.runner import LocalOptions, resolver_for, write_configs
from finetune_operator.local.tinymodel import build_demo_data
from finetune_operator.validation import validate
from finetune_operator.worker import markers
from finetune_operator.worker.train import checkpoints, is_complete_checkpoint
from tests.test_local_run import lf_env, shared_tiny_model

FTCTL = str(Path(sys.executable).parent / "ftctl")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory)


def one_stage_job(
    stage_args: dict[str, Any], *, method: str = "lora", deepspeed: dict[str, Any] | None = None, name: str = "resume"
) -> dict[str, Any]:
    """The demo spec reduced to one SFT stage with ``stage_args``."""
    doc = copy.deepcopy(demo.demo_spec())
    doc["metadata"]["name"] = name
    stage = doc["spec"]["stages"][0]
    stage["args"] = {
        "logging_steps": 1,
        "cutoff_len": 64,
        "max_samples": 32,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        **stage_args,
    }
    stage["method"] = method
    if method != "lora":
        stage.pop("lora", None)
    if deepspeed is not None:
        stage["deepspeed"] = deepspeed
    doc["spec"]["stages"] = [stage]
    doc["spec"]["merge"] = {"enabled": False}
    return doc


def prepare(tmp_path: Path, tiny_model: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    """Write the data and the generated configs; return (stage config, stage output dir)."""
    build_demo_data(tmp_path / "wd" / demo.DATA_CLAIM)
    job = validate(doc)
    opts = LocalOptions(workdir=tmp_path / "wd", volumes={demo.MODEL_CLAIM: str(tiny_model.parent)})
    cfg_dir = write_configs(job, resolver_for(job, opts))
    cfg = cfg_dir / "sft.yaml"
    return cfg, tmp_path / "wd" / "demo-outputs" / doc["metadata"]["name"] / "sft"


def run_until_step(argv: list[str], env: dict[str, str], step: int, log: Path) -> tuple[int, str]:
    """Start the worker, wait until its progress log reports ``step`` (an event read from its stderr, not a
    sleep), send SIGTERM, and return (exit code, stderr)."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:
            seen.append(line)
            if "[sft] step " in line and int(line.split("[sft] step ")[1].split("/")[0]) >= step:
                proc.send_signal(signal.SIGTERM)
                break
        seen += proc.stderr.readlines()
        return proc.wait(timeout=300), "".join(seen)


def trainer_log_steps(output_dir: Path) -> list[int]:
    return [json.loads(line)["current_steps"] for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.train
def test_sigterm_then_resume_from_checkpoint_then_noop(tiny_model: Path, tmp_path: Path) -> None:
    cfg, out = prepare(tmp_path, tiny_model, one_stage_job({"max_steps": 30, "save_steps": 2}))
    env = lf_env(FT_PROGRESS_POLL="0.05")
    argv = [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"]

    code, err = run_until_step(argv, env, 3, tmp_path / "first.log")
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted by signal 15" in err
    assert markers.read_marker(out) is None
    complete = [s for s, p in checkpoints(out) if is_complete_checkpoint(p)]
    assert complete and complete[0] == 2 and max(complete) < 30
    resume_from = max(complete)
    logged_before = len(trainer_log_steps(out))

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    resumed_steps = trainer_log_steps(out)[logged_before:]
    assert resumed_steps[0] == resume_from + 1  # continued from the checkpoint, not from step 1
    assert f"checkpoint-{resume_from}" in second.stderr + second.stdout
    marker = markers.read_marker(out)
    assert marker is not None and marker["steps"] == 30

    log_size = (out / "trainer_log.jsonl").stat().st_size
    third = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert third.returncode == 0 and "already complete" in third.stderr
    assert (out / "trainer_log.jsonl").stat().st_size == log_size


@pytest.mark.train
def test_leftovers_without_checkpoint_start_over(tiny_model: Path, tmp_path: Path) -> None:
    """Killed before the first save: LLaMA-Factory would refuse the non-empty folder; the worker starts over."""
    cfg, out = prepare(tmp_path, tiny_model, one_stage_job({"max_steps": 2, "save_steps": 100}))
    out.mkdir(parents=True)
    (out / "trainer_log.jsonl").write_text(json.dumps({"current_steps": 1, "total_steps": 2, "loss": 9.0}) + "\n")
    (out / "checkpoint-1").mkdir()  # cut short while saving: no trainer_state.json
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"],
        env=lf_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "incomplete" in proc.stderr and not (out / "checkpoint-1").exists()
    assert trainer_log_steps(out)[0] == 1 and json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.train
def test_killed_after_the_last_checkpoint_finishes_without_training_again(tiny_model: Path, tmp_path: Path) -> None:
    """Killed after the final checkpoint, before the final save: the Trainer would resume from ``checkpoint-N``
    and train step N+1 (it checks ``max_steps`` only after a step); the worker finishes from the checkpoint."""
    cfg, out = prepare(tmp_path, tiny_model, one_stage_job({"max_steps": 2, "save_steps": 2}))
    argv = [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"]
    first = subprocess.run(argv, env=lf_env(), capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr
    final = out / "checkpoint-2"
    assert is_complete_checkpoint(final)
    # What a kill between the last checkpoint and the end of the final save leaves: the checkpoint only.
    for path in out.iterdir():
        if path.is_file():
            path.unlink()
    logged = (final / "trainer_state.json").read_text()

    second = subprocess.run(argv, env=lf_env(), capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr
    assert "finishing from" in second.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "trainer_state.json").read_text() == logged
    assert (out / "adapter_model.safetensors").read_bytes() == (final / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_config.json").is_file() and not (out / "optimizer.pt").exists()
    marker = markers.read_marker(out)
    assert marker is not None and marker["steps"] == 2 and marker["totalSteps"] == 2
