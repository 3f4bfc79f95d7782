"""Evaluate, gate and publish end to end with ``ftctl run --local``: real LLaMA-Factory on CPU (tiny model),
real publishing clients against servers on 127.0.0.1 (hub stand-in, moto S3, distribution registry), Secrets
from ``--secrets-dir``. A failing gate publishes nothing; a missing Secret stops the run before training."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.local.tinymodel import build_demo_data
from finetune_operator.worker import lineage
from tests.publish_servers import publish_servers
from tests.test_local_run import FTCTL, ROOT, lf_env, shared_tiny_model

EXAMPLE = ROOT / "manifests" / "examples" / "local-demo-eval-publish.yaml"
SECRETS = {
    "hub-token": {"token": "hf_canary_local_publish_5772"},
    "s3-credentials": {"accessKeyId": "AKIACANARYLOCAL0001", "secretAccessKey": "s3-canary-local-secret-1414"},
    "registry-credentials": {"username": "publisher", "password": "oci-canary-local-password-1732"},
}
CANARIES = [v for keys in SECRETS.values() for k, v in keys.items() if k != "username"]


def _secrets_dir(root: Path, skip: tuple[str, str] | None = None) -> Path:
    for name, keys in SECRETS.items():
        for key, value in keys.items():
            if (name, key) == skip:
                continue
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / key).write_text(value + "\n")
    return root


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    creds, s3c = SECRETS["registry-credentials"], SECRETS["s3-credentials"]
    with publish_servers(
        tmp_path_factory.mktemp("local-servers"),
        hub_token=SECRETS["hub-token"]["token"],
        s3_key_id=s3c["accessKeyId"],
        s3_secret=s3c["secretAccessKey"],
        registry_user=creds["username"],
        registry_password=creds["password"],
        bucket="models",
    ) as servers:
        yield servers


def _spec(servers: dict[str, Any], path: Path, **gate: Any) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    dests = doc["spec"]["publish"]["destinations"]
    dests[0]["huggingface"]["endpoint"] = servers["hub"]
    dests[1]["s3"]["endpointUrl"] = servers["s3"]
    dests[2]["oci"]["reference"] = f"{servers['registry'].host}/demo/eval-publish-demo:v1"
    doc["spec"]["gate"].update(gate)
    path.write_text(yaml.safe_dump(doc))
    return path


def _workdir(factory: pytest.TempPathFactory, root: Path) -> Path:
    model = shared_tiny_model(factory)
    (root / "demo-models").mkdir(parents=True, exist_ok=True)
    link = root / "demo-models" / "tiny-qwen2"
    if not link.exists():
        link.symlink_to(model)
    build_demo_data(root / "demo-data")
    return root


def _ftctl(spec: Path, workdir: Path, secrets: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FTCTL, "run", "--local", "-f", str(spec), "--workdir", str(workdir), "--secrets-dir", str(secrets)],
        env=lf_env(),
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )


@pytest.mark.train
@pytest.mark.slow
def test_local_eval_gate_publish_end_to_end(
    servers: dict[str, Any], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = _workdir(tmp_path_factory, tmp_path / "w")
    secrets = _secrets_dir(tmp_path / "secrets")
    spec = _spec(servers, tmp_path / "job.yaml")
    proc = _ftctl(spec, workdir, secrets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gate passed" in proc.stderr

    run_dir = workdir / "demo-outputs" / "eval-publish-demo"
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["eval_loss"] > 0
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-l"} <= set(metrics["metrics"])
    predictions = (run_dir / "eval" / "predict" / "generated_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4 and {"prompt", "predict", "label"} <= set(json.loads(predictions[0]))

    merged = run_dir / "merged"
    doc = lineage.read_lineage(merged)
    assert doc is not None
    assert doc["metrics"]["eval_loss"] == metrics["metrics"]["eval_loss"]
    assert doc["stages"][0]["hyperparameters"]["learning_rate"] == 1.0e-3 and doc["stages"][0]["completedAt"]
    assert doc["baseModel"]["contentHash"].startswith("sha256:")
    assert doc["specHash"].startswith("sha256:") and doc["datasets"][0]["files"][0]["sha256"]

    local = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file() and not p.name.startswith(".")}
    repo = servers["hub_state"].repos["demo/eval-publish-demo"]
    assert repo.files == local and repo.private
    listing = servers["s3_client"].list_objects_v2(Bucket="models", Prefix="eval-publish-demo/")["Contents"]
    assert {o["Key"].split("/", 1)[1] for o in listing} == set(local)

    outputs = json.loads((workdir / ".finetune" / "eval-publish-demo" / "outputs.json").read_text())["outputs"]
    assert outputs["metrics"] == metrics["metrics"]
    assert [p["name"] for p in outputs["published"]] == ["hub", "bucket", "registry"]
    assert outputs["published"][2]["url"].startswith("oci://") and outputs["published"][2]["digest"]
    everything = proc.stdout + proc.stderr + json.dumps(outputs) + json.dumps(doc)
    assert not any(c in everything for c in CANARIES)
    for cfg in (workdir / ".finetune" / "eval-publish-demo" / "config").iterdir():
        assert not any(c in cfg.read_text() for c in CANARIES), cfg

    # A gate that the model misses: exit 11, nothing new published, the promoted metrics unchanged.
    commits = len(repo.commits)
    promoted = (workdir / ".finetune" / "eval-publish-demo" / "promoted.json").read_text()
    strict = _spec(servers, tmp_path / "strict.yaml", threshold=0.0001)
    failed = _ftctl(strict, workdir, secrets)
    assert failed.returncode == 11, failed.stderr[-3000:]
    assert "GateFailed" in failed.stderr and "misses the threshold" in failed.stderr
    assert len(repo.commits) == commits
    assert (workdir / ".finetune" / "eval-publish-demo" / "promoted.json").read_text() == promoted

    # A re-run with the passing gate finds everything complete and uploads nothing new.
    again = _ftctl(spec, workdir, secrets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("(0 uploaded,") == 3, again.stderr[-3000:]
    assert len(repo.commits) == commits


def test_missing_secret_stops_before_training(servers: dict[str, Any], tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    workdir.mkdir()
    secrets = _secrets_dir(tmp_path / "secrets", skip=("s3-credentials", "secretAccessKey"))
    proc = _ftctl(_spec(servers, tmp_path / "job.yaml"), workdir, secrets)
    assert proc.returncode == 1
    assert "spec.publish.destinations: Secret 's3-credentials' has no key 'secretAccessKey'" in proc.stderr
    assert not (workdir / "demo-outputs").exists()  # nothing ran
    no_dir = subprocess.run(
        [FTCTL, "run", "--local", "-f", str(tmp_path / "job.yaml"), "--workdir", str(workdir)],
        env=lf_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert no_dir.returncode == 1 and "pass --secrets-dir DIR with DIR/hub-token/token" in no_dir.stderr


@pytest.mark.train
def test_benchmark_in_llamafactory_eval_format(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The benchmark run: LLaMA-Factory's multiple-choice evaluator on a task folder in its eval format, its
    category scores folded into ``benchmark_*`` metrics, and the lineage next to the model gets them."""
    from finetune_operator.worker.evaluate import run_eval

    model = shared_tiny_model(tmp_path_factory)
    out = tmp_path / "eval"
    config = {
        "outputDir": str(out),
        "metricsFile": str(out / "metrics.json"),
        "runs": {
            "benchmark": {
                "model_name_or_path": str(model),
                "template": "qwen",
                "finetuning_type": "full",
                "task": "tiny_test",
                "task_dir": str(ROOT / "tests/fixtures/eval-tasks"),
                "lang": "en",
                "n_shot": 1,
                "save_dir": str(out / "benchmark"),
            }
        },
    }
    res = run_eval(config, environ=lf_env())
    assert res.ran and set(res.metrics) == {"benchmark_average", "benchmark_stem", "benchmark_humanities"}
    assert 0.0 <= res.metrics["benchmark_average"] <= 100.0
    again = run_eval(config, environ=lf_env())
    assert not again.ran and again.metrics == res.metrics  # metrics.json is the completion marker
