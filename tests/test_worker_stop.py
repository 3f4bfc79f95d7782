"""``ftctl worker stop``, the preStop hook of pods whose PID 1 is not the worker (DeepSpeedJob: sshd).

Real LLaMA-Factory on CPU: a training worker runs; the hook (another process, as the kubelet runs it) makes it
save a checkpoint at the next step boundary and returns only after it has exited, so that the kubelet's SIGTERM
to sshd, which kills everything left, comes after the checkpoint.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from finetune_operator.worker import markers
from finetune_operator.worker.train import checkpoints, is_complete_checkpoint
from tests.test_local_run import lf_env
from tests.test_worker_resume import FTCTL, one_stage_job, prepare, tiny_model

__all__ = ["tiny_model"]


def test_stop_without_running_workers_returns_at_once(tmp_path: Path) -> None:
    env = lf_env(FT_RUNNING_DIR=str(tmp_path / "running"))
    proc = subprocess.run([FTCTL, "worker", "stop"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_stale_entry_of_another_process_is_not_signalled(tmp_path: Path) -> None:
    running = tmp_path / "running"
    running.mkdir()
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        (running / str(bystander.pid)).write_text("train\n")  # a recycled PID: not a training worker
        env = lf_env(FT_RUNNING_DIR=str(running))
        proc = subprocess.run([FTCTL, "worker", "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.train
def test_prestop_checkpoints_the_trainer_and_waits_for_it(tiny_model: Path, tmp_path: Path) -> None:
    cfg, out = prepare(tmp_path, tiny_model, one_stage_job({"max_steps": 60, "save_steps": 100}))
    running = tmp_path / "running"
    env = lf_env(FT_PROGRESS_POLL="0.05", FT_RUNNING_DIR=str(running))
    train = subprocess.Popen(
        [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert train.stderr is not None
    seen: list[str] = []
    for line in train.stderr:
        seen.append(line)
        if "[sft] step " in line and int(line.split("[sft] step ")[1].split("/")[0]) >= 2:
            break
    assert [p.name for p in running.iterdir()] == [str(train.pid)]

    hook = subprocess.run([FTCTL, "worker", "stop"], env=env, capture_output=True, text=True, timeout=300)
    # The hook returned only after the worker had exited: nothing is left for the SIGTERM to sshd to kill.
    assert train.poll() is not None, hook.stderr
    seen += train.stderr.readlines()
    err = "".join(seen)
    assert hook.returncode == 0, hook.stderr
    assert f"training worker {train.pid} has stopped" in hook.stderr
    assert train.returncode == 128 + signal.SIGTERM, err
    assert "saved on preemption" in err
    saved = [s for s, p in checkpoints(out) if is_complete_checkpoint(p)]
    assert len(saved) == 1 and 2 <= saved[0] < 60  # save_steps is 100: this one is the preemption checkpoint
    assert markers.read_marker(out) is None
    assert not any(running.iterdir())
