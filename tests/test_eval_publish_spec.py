"""The evaluate, gate and publish blocks: validation (every error with its path), the CRD's CEL rules, the
render (eval/publish steps, credentials only as secretKeyRef), and the gate's decision."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from finetune_operator.api.types import GateSpec
from finetune_operator.promotion import decide
from finetune_operator.render import config_files, render
from finetune_operator.validation import check, validate
from tests.test_crd import _cel_failures
from tests.test_validation import base, both, drop, put

HUB = {"repoId": "org/model", "tokenSecretRef": {"name": "hub", "key": "token"}}
S3 = {
    "bucket": "models",
    "prefix": "demo",
    "endpointUrl": "http://minio.storage:9000",
    "accessKeyIdSecretRef": {"name": "s3", "key": "id"},
    "secretAccessKeySecretRef": {"name": "s3", "key": "secret"},
}
OCI = {
    "reference": "registry.example.com/ml/demo:v1",
    "usernameSecretRef": {"name": "reg", "key": "user"},
    "passwordSecretRef": {"name": "reg", "key": "password"},
}


def full() -> dict[str, Any]:
    obj = base()
    obj["spec"]["evaluate"] = {
        "datasets": ["chat"],
        "loss": True,
        "generation": True,
        "maxSamples": 100,
        "args": {"max_new_tokens": 64},
    }
    obj["spec"]["gate"] = {"metric": "eval_loss", "threshold": 2.0, "noWorseThanServing": True, "margin": 0.05}
    obj["spec"]["publish"] = {
        "destinations": [
            {"name": "hub", "huggingface": HUB},
            {"name": "bucket", "s3": S3},
            {"name": "registry", "oci": OCI},
        ]
    }
    return copy.deepcopy(obj)  # the mutations edit in place: never the module's constants


def test_full_spec_is_valid_and_passes_cel() -> None:
    validate(full())
    assert _cel_failures(full()) == []


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("gate-without-evaluate", drop("spec.evaluate"), "spec.gate", "needs spec.evaluate"),
    (
        "metric-not-produced",
        put("spec.gate.metric", "benchmark_average"),
        "spec.gate.metric",
        "does not produce 'benchmark_average'",
    ),
    ("metric-typo", put("spec.gate.metric", "eval_los"), "spec.gate.metric", "did you mean"),
    (
        "no-rule",
        both(drop("spec.gate.threshold"), put("spec.gate.noWorseThanServing", False)),
        "spec.gate",
        "threshold and/or noWorseThanServing",
    ),
    ("undeclared-eval-dataset", put("spec.evaluate.datasets", ["nope"]), "spec.evaluate.datasets[0]", "not declared"),
    ("ranking-eval-dataset", put("spec.evaluate.datasets", ["prefs"]), "spec.evaluate.datasets[0]", "ranking"),
    (
        "owned-eval-arg",
        put("spec.evaluate.args", {"do_predict": True}),
        "spec.evaluate.args.do_predict",
        "spec.evaluate.generation",
    ),
    (
        "secret-eval-arg",
        put("spec.evaluate.args", {"hf_hub_token": "x"}),
        "spec.evaluate.args.hf_hub_token",
        "credentials",
    ),
    (
        "merged-without-merge",
        both(put("spec.merge.enabled", False), put("spec.publish.artifact", "merged")),
        "spec.publish.artifact",
        "needs spec.merge.enabled",
    ),
    ("stacked-adapters", put("spec.merge.enabled", False), "spec.publish.artifact", "stack several LoRA"),
    ("two-kinds", put("spec.publish.destinations[0].s3", S3), "spec.publish.destinations[0]", "exactly one"),
    ("no-kind", put("spec.publish.destinations[0]", {"name": "x"}), "spec.publish.destinations[0]", "exactly one"),
    (
        "half-s3-creds",
        drop("spec.publish.destinations[1].s3.secretAccessKeySecretRef"),
        "spec.publish.destinations[1].s3",
        "both",
    ),
    (
        "half-oci-creds",
        drop("spec.publish.destinations[2].oci.passwordSecretRef"),
        "spec.publish.destinations[2].oci",
        "both",
    ),
    (
        "duplicate-name",
        put("spec.publish.destinations[1].name", "hub"),
        "spec.publish.destinations[1].name",
        "used twice",
    ),
    (
        "bad-repo-id",
        put("spec.publish.destinations[0].huggingface.repoId", "no-owner"),
        "spec.publish.destinations[0].huggingface.repoId",
        "",
    ),
    (
        "bad-bucket",
        put("spec.publish.destinations[1].s3.bucket", "Bad_Bucket"),
        "spec.publish.destinations[1].s3.bucket",
        "",
    ),
    (
        "bad-endpoint",
        put("spec.publish.destinations[1].s3.endpointUrl", "minio:9000"),
        "spec.publish.destinations[1].s3.endpointUrl",
        "",
    ),
    (
        "bad-reference",
        put("spec.publish.destinations[2].oci.reference", "registry.example.com/ml/demo"),
        "spec.publish.destinations[2].oci.reference",
        "",
    ),
    (
        "missing-token",
        drop("spec.publish.destinations[0].huggingface.tokenSecretRef"),
        "spec.publish.destinations[0].huggingface.tokenSecretRef",
        "",
    ),
    ("reserved-stage-name", put("spec.stages[1].name", "publish"), "spec.stages[1].name", "reserved"),
]


@pytest.mark.parametrize(("mutate", "path", "word"), [pytest.param(m, p, w, id=i) for i, m, p, w in BAD])
def test_bad_blocks_name_the_field(mutate: Callable[[dict[str, Any]], None], path: str, word: str) -> None:
    obj = full()
    mutate(obj)
    _, errors = check(obj)
    hits = [e for e in errors if e.path == path]
    assert hits, [str(e) for e in errors]
    assert any(word in e.message for e in hits), [str(e) for e in hits]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (drop("spec.evaluate"), "a gate needs spec.evaluate"),
        (put("spec.publish.destinations[0].s3", S3), "exactly one of huggingface, s3 or oci"),
    ],
)
def test_cel_rejects(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    obj = full()
    mutate(obj)
    assert any(message in f for f in _cel_failures(obj))


def test_render_eval_and_publish_steps() -> None:
    job = validate(full())
    plan = render(job)
    names = [s.name for s in plan.steps]
    assert names == ["preflight", "sft", "dpo", "merge", "eval", "publish"]
    files = config_files(job)
    ev = yaml.safe_load(files["eval.yaml"])
    assert set(ev["runs"]) == {"loss", "predict"}
    assert ev["runs"]["loss"]["do_eval"] is True and ev["runs"]["loss"]["eval_dataset"] == "chat"
    assert ev["runs"]["predict"]["predict_with_generate"] is True
    assert ev["runs"]["predict"]["model_name_or_path"] == "/mnt/volumes/outputs/demo/merged"
    assert ev["runs"]["predict"]["max_new_tokens"] == 64 and ev["runs"]["predict"]["max_samples"] == 100
    assert ev["lineage"]["specHash"].startswith("sha256:")
    pub = yaml.safe_load(files["publish.yaml"])
    assert [d["type"] for d in pub["destinations"]] == ["huggingface", "s3", "oci"]
    assert pub["metricsFile"].endswith("/eval/metrics.json")
    publish_pod = plan.step("publish").workload["spec"]["template"]["spec"]
    env = {e["name"]: e for e in publish_pod["containers"][0]["env"]}
    assert env["FT_PUBLISH_0_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hub", "key": "token", "optional": False}
    assert env["FT_PUBLISH_2_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "reg"
    assert "HF_HUB_OFFLINE" not in env  # publishing goes online; evaluation does not
    eval_env = {e["name"] for e in plan.step("eval").workload["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "HF_HUB_OFFLINE" in eval_env and not any(n.startswith("FT_PUBLISH") for n in eval_env)
    assert plan.outputs["predictions"].endswith("/eval/predict/generated_predictions.jsonl")
    assert plan.outputs["lineage"] == "/mnt/volumes/outputs/demo/merged/finetune-lineage.json"


@pytest.mark.train
def test_lf_accepts_the_eval_configs() -> None:
    """LLaMA-Factory's own argument parser accepts the rendered evaluation runs (paths swapped for ones it can
    resolve without the volumes)."""
    from llamafactory.hparams import get_train_args

    job = validate(full())
    ev = yaml.safe_load(config_files(job)["eval.yaml"])
    for run in ev["runs"].values():
        get_train_args(
            {**run, "model_name_or_path": "Qwen/Qwen2-0.5B", "eval_dataset": "identity", "dataset_dir": "data"}
        )


GATE = GateSpec(metric="eval_loss", threshold=2.0, no_worse_than_serving=True, margin=0.1)


@pytest.mark.parametrize(
    ("metrics", "serving", "passed", "word"),
    [
        ({"eval_loss": 1.5}, {}, True, "no serving model"),
        ({"eval_loss": 1.5}, {"eval_loss": 1.45}, True, "no worse than"),
        ({"eval_loss": 1.6}, {"eval_loss": 1.45}, False, "worse than the serving model's 1.45"),
        ({"eval_loss": 2.5}, {}, False, "misses the threshold (at most 2)"),
        ({"predict_bleu-4": 10.0}, {}, False, "did not report eval_loss"),
    ],
)
def test_gate_decision(metrics: dict[str, float], serving: dict[str, float], passed: bool, word: str) -> None:
    decision = decide(GATE, metrics, serving)
    assert decision.passed is passed and word in decision.message


def test_gate_higher_is_better_by_default_for_scores() -> None:
    gate = GateSpec(metric="predict_bleu-4", threshold=20.0)
    assert decide(gate, {"predict_bleu-4": 25.0}).passed
    assert not decide(gate, {"predict_bleu-4": 15.0}).passed
    assert not decide(
        GateSpec(metric="benchmark_average", threshold=50, higher_is_better=False), {"benchmark_average": 60}
    ).passed


def test_publish_credentials_travel_only_by_reference_to_the_publish_pod(tmp_path: Any) -> None:
    """Secret canary for the publishing credentials: exported in the shell, they reach no rendered object; the
    Secrets they name are referenced by the publish container only, as ``secretKeyRef``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    canary = "canary-publish-credential-7e3f"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(full()))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": canary,
        "AWS_SECRET_ACCESS_KEY": canary,
        "HF_TOKEN": canary,
        "FT_PUBLISH_0_TOKEN": canary,
        "ORAS_PASSWORD": canary,
    }
    ftctl = str(Path(sys.executable).parent / "ftctl")
    out = subprocess.run([ftctl, "render", "-f", str(spec)], env=env, capture_output=True, text=True, check=True)
    assert canary not in out.stdout + out.stderr
    refs: dict[str, set[str]] = {}
    for obj in yaml.safe_load_all(out.stdout):
        if not obj or obj["kind"] == "ConfigMap":
            continue
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for var in container.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.setdefault(obj["metadata"]["name"], set()).add(ref["name"])
    assert refs == {"demo-publish": {"hub", "s3", "reg"}}


def test_operator_accepts_a_gate() -> None:
    """The operator enforces the gate (tests/test_operator_eval_publish.py), so it accepts a gated job."""
    from finetune_operator.controller.runtime import make_validate

    job = make_validate()(full())
    assert job.spec.gate is not None and job.spec.publish is not None


def test_an_adapter_is_published_without_its_checkpoints(tmp_path: Any) -> None:
    from finetune_operator.worker.publish.files import collect

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "events").write_bytes(b"x")
    (tmp_path / ".finetune-complete.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "checkpoint-notes.txt").write_text("a file, not a checkpoint folder")
    assert [f.rel for f in collect(tmp_path)] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint-notes.txt",
    ]
