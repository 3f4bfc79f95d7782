"""SFT → RM → PPO through ``ftctl run --local`` with real LLaMA-Factory on CPU and the tiny model.

The reward model trains for real from the SFT result and is neither stacked into later stages nor merged. PPO
trains for real too: LLaMA-Factory 0.9.5's PPO trainer needs trl 0.8.6-0.9.6 while the environment pins trl 0.24
(its DPO/KTO need >= 0.18), so the worker gives the ppo stage's trainer the separate trl of
``.venv-trl-ppo`` (scripts/setup.sh; ``/opt/trl-ppo`` in the image) and nothing else changes
(worker/ppo_runtime.py, worker/ppocompat.py). Then the merge stacks the SFT and PPO adapters.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from finetune_operator.local import demo
from finetune_operator.local.tinymodel import build_demo_data
from finetune_operator.worker import markers, ppo_runtime
from tests.test_local_run import lf_env, shared_tiny_model
from tests.test_ppo_runtime import DEV_FOLDER
from tests.test_worker_resume import FTCTL

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory)


def rlhf_job() -> dict[str, Any]:
    doc = copy.deepcopy(demo.demo_spec())
    doc["metadata"]["name"] = "rlhf"
    fast = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_steps": 100,
        "cutoff_len": 64,
        "max_samples": 8,
    }
    sft, _dpo = doc["spec"]["stages"]
    sft["args"] = dict(fast)
    doc["spec"]["stages"] = [
        sft,
        {
            "name": "rm",
            "type": "rm",
            "datasets": ["prefs"],
            "method": "lora",
            "resources": {"gpusPerNode": 0},
            "args": dict(fast),
        },
        {
            "name": "ppo",
            "type": "ppo",
            "datasets": ["chat"],
            "method": "lora",
            "resources": {"gpusPerNode": 0},
            "rewardModel": {"stage": "rm"},
            "args": {**fast, "ppo_epochs": 1, "ppo_buffer_size": 1, "max_new_tokens": 8},
        },
    ]
    doc["spec"]["merge"] = {"enabled": True}
    return doc


def test_sft_rm_ppo_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    build_demo_data(wd / demo.DATA_CLAIM)
    spec = tmp_path / "rlhf.yaml"
    spec.write_text(yaml.safe_dump(rlhf_job()))
    proc = subprocess.run(
        [
            FTCTL,
            "run",
            "--local",
            "-f",
            str(spec),
            "--workdir",
            str(wd),
            "--no-serve",
            "--volume",
            f"{demo.MODEL_CLAIM}={tiny_model.parent}",
        ],
        env=lf_env(**{ppo_runtime.PATH_ENV: str(DEV_FOLDER)}),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    out = wd / "demo-outputs" / "rlhf"
    logs = wd / ".finetune" / "rlhf" / "logs"
    assert markers.read_marker(out / "sft") is not None, proc.stderr[-3000:]
    # The reward model trained for real, from the SFT result: a LoRA adapter plus the value head.
    assert markers.read_marker(out / "rm") is not None, proc.stderr[-3000:]
    assert (out / "rm" / "adapter_model.safetensors").is_file()
    assert (out / "rm" / "value_head.safetensors").is_file()
    cfg_dir = wd / ".finetune" / "rlhf" / "config"
    rm_cfg = yaml.safe_load((cfg_dir / "rm.yaml").read_text())
    assert rm_cfg["adapter_name_or_path"] == str(out / "sft")
    ppo_cfg = yaml.safe_load((cfg_dir / "ppo.yaml").read_text())
    assert ppo_cfg["adapter_name_or_path"] == str(out / "sft")  # not …/sft,…/rm
    assert (ppo_cfg["reward_model"], ppo_cfg["reward_model_type"]) == (str(out / "rm"), "lora")
    merge_cfg = yaml.safe_load((cfg_dir / "merge.yaml").read_text())
    assert merge_cfg["adapter_name_or_path"] == f"{out / 'sft'},{out / 'ppo'}"

    assert proc.returncode == 0, proc.stderr[-3000:]

    # PPO trained for real, with the separate trl (and only PPO did): two steps, each with a reward.
    ppo_log = (logs / "ppo.log").read_text()
    assert f"ppo stage: the PPO trl from {DEV_FOLDER}" in ppo_log
    assert "ppo stage" not in (logs / "rm.log").read_text()
    done = markers.read_marker(out / "ppo")
    assert done is not None and done["steps"] == 2, done
    rows = [json.loads(line) for line in (out / "ppo" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in rows] == [1, 2]
    assert all(isinstance(r["reward"], float) and math.isfinite(r["reward"]) for r in rows), rows
    # The policy adapter moved away from LoRA's zero start, and the value head was saved beside it.
    adapter = load_file(out / "ppo" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and bool(t.abs().sum() > 0) for k, t in adapter.items())
    assert (out / "ppo" / "value_head.safetensors").is_file()
    # The merge took the SFT and PPO adapters (not the reward model's) into a loadable model.
    assert markers.read_marker(out / "merged") is not None
    assert (out / "merged" / "config.json").is_file()
