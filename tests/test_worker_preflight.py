"""``ftctl worker preflight`` as the pod runs it: real LLaMA-Factory data check on the tiny model and the demo
data, ``status.plan`` written through the worker ServiceAccount (RBAC enforced by the emulator), and the exit
code the operator reads: 0 ok (or Warn), 9 will not fit, 3 unusable data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.types import FineTuneJob
from finetune_operator.render import config_files
from tests.install_tools import WORKER_SA_NAME, installed_chart
from tests.test_local_run import lf_env, shared_tiny_model

pytestmark = pytest.mark.train
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_operator.local.tinymodel import build_demo_data

    root = tmp_path_factory.mktemp("volumes")
    shutil.copytree(shared_tiny_model(tmp_path_factory), root / "demo-models" / "tiny-qwen2")
    build_demo_data(root / "demo-data")
    return root


def demo(name: str, **changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests/examples/local-demo.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "default"}
    doc["spec"].update(changes)
    return doc


def run(server: Any, doc: dict[str, Any], root: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    server.create(doc, "default")
    config = tmp_path / "preflight.json"
    config.write_text(config_files(FineTuneJob.model_validate(doc))["preflight.json"])
    token = tmp_path / "token"
    token.write_text("node-0-token\n")
    env = lf_env(
        FT_JOB_NAME=doc["metadata"]["name"],
        FT_JOB_NAMESPACE="default",
        FT_KUBE_API=server.url,
        FT_KUBE_TOKEN_FILE=str(token),
        FT_VOLUME_ROOT=str(root),
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ftctl"), "worker", "preflight", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc, server.get("finetunejobs", doc["metadata"]["name"], "default").get("status", {}).get("plan")


@pytest.fixture()
def server(emulator_server: Any) -> Any:
    emulator_server.apply_crd(ROOT / "crds")
    # the opt-in shared worker ServiceAccount of the chart (per-job identities get the same single permission)
    chart = installed_chart({"worker": {"create": True}})
    emulator_server.enforce_rbac(chart, {"node-0-token": ("default", WORKER_SA_NAME)})
    return emulator_server


def test_a_good_job_passes_and_reports_its_plan(server: Any, volumes: Path, tmp_path: Path) -> None:
    proc, plan = run(server, demo("good"), volumes, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s["name"] for s in plan["stages"]] == ["sft", "dpo"]
    sft = plan["stages"][0]
    assert sft["samples"] == 64 and sft["dropped"] == 0 and sft["totalSteps"] == 6
    assert "reason" not in plan
    assert not server.emulator.authorizer.denied  # the chart's worker Role allows exactly this patch


def test_a_stage_that_will_not_fit_exits_twelve(server: Any, volumes: Path, tmp_path: Path) -> None:
    doc = demo("big")
    doc["spec"]["stages"][0]["resources"] = {"gpusPerNode": 1, "gpuMemory": "512Mi"}
    proc, plan = run(server, doc, volumes, tmp_path)
    assert proc.returncode == 12, proc.stderr[-2000:]
    assert plan["reason"] == "WillNotFit" and plan["message"].startswith("stage sft: estimated peak 1.")
    assert "512Mi GPU" in plan["message"]
    assert "WillNotFit: stage sft" in proc.stderr


def test_unusable_data_exits_three(server: Any, volumes: Path, tmp_path: Path) -> None:
    root = tmp_path / "vol"
    shutil.copytree(volumes, root)
    (root / "demo-data" / "dpo-pairs.jsonl").write_text('{"messages": "not a list"}\n' * 4)
    proc, plan = run(server, demo("bad"), root, tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert plan["reason"] == "InvalidData"
    assert f"{root / 'demo-data' / 'dpo-pairs.jsonl'}:1:" in plan["message"]
