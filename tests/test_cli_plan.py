"""``ftctl plan`` end to end: the demo with its real data (LLaMA-Factory on CPU), broken data, a model that is
still to be downloaded, a job that cannot fit, JSON output, every example."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_local_run import lf_env, shared_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FTCTL = str(Path(sys.executable).parent / "ftctl")
CONFIGS = ROOT / "tests" / "fixtures" / "model-configs"


def ftctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FTCTL, "plan", *args], capture_output=True, text=True, env=lf_env(), cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_operator.local.tinymodel import build_demo_data

    wd = tmp_path_factory.mktemp("plan-demo")
    model = shared_tiny_model(tmp_path_factory)
    (wd / "demo-models").mkdir()
    shutil.copytree(model, wd / "demo-models" / "tiny-qwen2")
    build_demo_data(wd / "demo-data")
    return wd


def test_example_with_model_config_fixture_json_shape() -> None:
    out = ftctl(
        "-f",
        str(ROOT / "manifests/examples/03-full-sft-zero3-two-nodes.yaml"),
        "--model-config",
        str(CONFIGS / "mistral-7b-v0.3.json"),
        "-o",
        "json",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    stage = doc["stages"][0]
    assert stage["name"] == "sft" and stage["fits"] is True and stage["verdict"] == "fits"
    assert stage["gpu"] == {"name": "NVIDIA A100 80GB", "memoryGiB": 80.0}
    assert stage["parameters"]["total"] == 7_248_023_552
    assert stage["gpuMemoryGiB"] == pytest.approx(sum(stage["breakdown"].values()), abs=0.05)
    assert stage["suggestion"] is None
    assert doc["verdict"] == {"reason": None, "message": "ok"}


def test_a_job_that_cannot_fit_exits_one_with_the_fix() -> None:
    out = ftctl(
        "-f",
        str(ROOT / "manifests/examples/01-lora-sft-single-gpu.yaml"),
        "--model-config",
        str(CONFIGS / "llama3-70b.json"),
        "--gpu",
        "NVIDIA-A100-SXM4-80GB",
    )
    assert out.returncode == 1
    assert "does not fit" in out.stdout
    assert "verdict: WillNotFit: stage sft: estimated peak" in out.stdout
    assert "suggestion  spec.stages[0]." in out.stdout


def test_model_source_without_local_copy_says_so(tmp_path: Path) -> None:
    out = ftctl("-f", str(ROOT / "manifests/examples/06-contract-sft-dpo-merge-serve.yaml"), "--workdir", str(tmp_path))
    assert out.returncode == 4
    assert "has no local copy" in out.stderr and "--model-config" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_spec_and_bad_usage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "x"},
                "spec": {"stages": []},
            }
        )
    )
    out = ftctl("-f", str(bad))
    assert out.returncode == 1 and "spec.model" in out.stderr
    out = ftctl("-f", str(bad), "--volume", "nodir")
    assert out.returncode == 2 and "CLAIM=DIR" in out.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "manifests/examples").glob("0*.yaml")), ids=lambda p: p.name)
def test_every_example_plans_with_a_real_family(path: Path) -> None:
    out = ftctl("-f", str(path), "--model-config", str(CONFIGS / "qwen2-7b.json"), "--gpu", "H100", "-o", "json")
    assert out.returncode in (0, 1), out.stderr
    doc = json.loads(out.stdout)
    assert [s["name"] for s in doc["stages"]] == [s["name"] for s in yaml.safe_load(path.read_text())["spec"]["stages"]]
    assert all(s["gpuMemoryGiB"] > 0 and s["gpu"]["name"] == "NVIDIA H100 SXM 80GB" for s in doc["stages"])


@pytest.mark.train
def test_demo_plan_with_real_data(demo_dir: Path) -> None:
    out = ftctl("-f", str(ROOT / "manifests/examples/local-demo.yaml"), "--workdir", str(demo_dir), "-o", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    sft, dpo = doc["stages"]
    assert sft["fits"] is True and sft["verdict"] == "no GPU (CPU stage)"
    assert [d["name"] for d in sft["data"]["datasets"]] == ["chat", "describe"]
    assert sft["data"]["samples"] == 64 and sft["data"]["datasets"][0]["dropped"] == {}
    assert sft["totalSteps"] == 6 and sft["stepsPerEpoch"] == 32
    assert dpo["data"]["samples"] == 32 and dpo["sequencesPerStep"] == 4


@pytest.mark.train
def test_broken_data_is_refused_with_file_and_line(demo_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_dir / "demo-data", data)
    rows = [json.loads(line) for line in (data / "dpo-pairs.jsonl").read_text().splitlines()]
    broken: list[Any] = [
        {
            "messages": r["messages"] + [{"role": "assistant", "content": "x"}],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
        }
        for r in rows
    ]
    (data / "dpo-pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    out = ftctl(
        "-f",
        str(ROOT / "manifests/examples/local-demo.yaml"),
        "--workdir",
        str(demo_dir),
        "--volume",
        f"demo-data={data}",
    )
    assert out.returncode == 1
    assert (
        f"verdict: InvalidData: stage dpo: no valid samples (first problem: {data / 'dpo-pairs.jsonl'}:1:" in out.stdout
    )
    assert "prefs: 32 rows, 0 valid, dropped 32 wrong_turns" in out.stdout
