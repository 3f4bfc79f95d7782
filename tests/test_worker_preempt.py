"""Checkpoint on preemption and on a clock (issue 16, item 5).

SIGTERM mid-run makes the trainer save a checkpoint at the next step boundary and exit; the retry resumes from
that step, so at most the step in flight is lost. Real LLaMA-Factory on CPU with the tiny model; the decision
logic (clock, stop request, rank agreement) is also tested on its own with a fake clock.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from finetune_operator.worker import markers, preempt
from finetune_operator.worker.lfentry import torchrun_argv
from finetune_operator.worker.train import checkpoints, is_complete_checkpoint
from tests.test_local_run import lf_env
from tests.test_worker_resume import FTCTL, one_stage_job, prepare, run_until_step, tiny_model, trainer_log_steps

__all__ = ["tiny_model"]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2h", 7200)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert preempt.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "0s", "1d", "m", "5 m", "-1m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        preempt.parse_duration(text)


def test_stop_deadline_leaves_a_margin_of_the_grace_period() -> None:
    assert preempt.stop_deadline({}) == preempt.DEFAULT_GRACE_SECONDS - preempt.GRACE_MARGIN_SECONDS
    assert preempt.stop_deadline({preempt.GRACE_ENV: "600"}) == 590
    assert preempt.stop_deadline({preempt.GRACE_ENV: "3"}) == 1.0


def test_policy_clock_and_stop(tmp_path: Path) -> None:
    now = [0.0]
    policy = preempt.Policy(str(tmp_path), 30.0, clock=lambda: now[0])
    control = preempt.Control(tmp_path)
    assert not control.training_started()
    policy.training_begins(is_local_zero=True)
    assert control.training_started()
    now[0] = 29.0
    assert policy.step_end() == preempt.Decision(save=False, stop=False)
    now[0] = 30.0
    assert policy.step_end() == preempt.Decision(save=True, stop=False)
    assert policy.saved(7, is_world_zero=True) is False  # a clock checkpoint: training goes on
    now[0] = 31.0
    assert policy.step_end().save is False  # the clock restarted at the save
    control.request_stop()
    assert policy.step_end() == preempt.Decision(save=True, stop=True)
    assert control.preempted_step() is None
    assert policy.saved(9, is_world_zero=True) is True
    assert control.preempted_step() == 9


def test_policy_follows_the_other_ranks() -> None:
    """A rank that saw no stop request still stops when another one did (the all-reduce of the maximum)."""
    policy = preempt.Policy(None, None, agree=lambda flags: [1, 0])
    assert policy.step_end() == preempt.Decision(save=True, stop=True)
    assert policy.saved(4, is_world_zero=False) is True


def test_torchrun_argv_mirrors_llamafactory_launcher() -> None:
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4", "MASTER_ADDR": "m", "MASTER_PORT": "29500"}
    assert torchrun_argv(env, ["sft.yaml", "a=b"]) == [
        "torchrun",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--nproc_per_node",
        "4",
        "--master_addr",
        "m",
        "--master_port",
        "29500",
        "-m",
        "finetune_operator.worker.lfentry",
        "sft.yaml",
        "a=b",
    ]
    elastic = torchrun_argv({**env, "RDZV_ID": "j", "MIN_NNODES": "1", "MAX_NNODES": "3"}, ["sft.yaml"])
    assert elastic[:4] == ["torchrun", "--nnodes", "1:3", "--nproc-per-node"] and "--rdzv-id" in elastic


@pytest.mark.train
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_resume_loses_at_most_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    # save_steps far beyond max_steps: the only checkpoint is the one the SIGTERM asks for.
    cfg, out = prepare(tmp_path, tiny_model, one_stage_job({"max_steps": 40, "save_steps": 1000}))
    env = lf_env(FT_PROGRESS_POLL="0.05")
    argv = [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"]

    code, err = run_until_step(argv, env, 3, tmp_path / "first.log")
    assert code == 128 + signal.SIGTERM, err
    assert markers.read_marker(out) is None
    complete = [s for s, p in checkpoints(out) if is_complete_checkpoint(p)]
    assert len(complete) == 1, complete
    saved = complete[0]
    assert 3 <= saved < 40
    assert f"checkpoint-{saved} saved on preemption" in err
    logged = trainer_log_steps(out)
    # No step finished after the checkpoint: the preempted run lost nothing it had completed.
    assert max(logged) == saved

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr
    resumed = trainer_log_steps(out)[len(logged) :]
    assert resumed[0] == saved + 1 and resumed[-1] == 40
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 40


@pytest.mark.train
def test_time_based_checkpoints(tiny_model: Path, tmp_path: Path) -> None:
    """``checkpoint.every``: an interval shorter than any step saves at every step boundary, with save_steps
    far away (the wiring of the clock into the real Trainer; the clock itself is tested above)."""
    cfg, out = prepare(tmp_path, tiny_model, one_stage_job({"max_steps": 3, "save_steps": 1000}))
    env = lf_env(**{preempt.CHECKPOINT_EVERY_ENV: "0.000001"})
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [s for s, p in checkpoints(out) if is_complete_checkpoint(p)] == [1, 2, 3]
