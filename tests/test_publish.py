"""Publishing against real servers on 127.0.0.1: a Hugging Face-compatible hub (stand-in speaking the Hub
API to the real ``huggingface_hub``), S3 (moto's server, real ``boto3``) and an OCI registry (Debian's
distribution registry, real ``oras`` SDK).

What must hold: every copy has every file and ``finetune-lineage.json``; a re-run uploads nothing; a changed
file is the only thing uploaded again; credentials appear in no message, result or lineage file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.errors import PublishError
from finetune_operator.worker import lineage, markers
from finetune_operator.worker.publish import oci, run_publish
from tests.hub_standin import HubState
from tests.publish_servers import Registry, publish_servers

FTCTL = str(Path(sys.executable).parent / "ftctl")
pytestmark = pytest.mark.slow
HUB_TOKEN = "hf_canary_publish_token_3141"
S3_KEY_ID = "AKIACANARYKEYID0001"
S3_SECRET = "s3-canary-secret-2718281828"
OCI_USER = "publisher"
OCI_PASSWORD = "oci-canary-password-1618"
SECRETS = (HUB_TOKEN, S3_SECRET, OCI_PASSWORD)
BUCKET = "models"


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in-process publishing as the publish pod runs: online.

    The test command exports ``HF_HUB_OFFLINE=1`` for everything else, and ``huggingface_hub`` reads it once, at
    import, into ``constants``; the rendered publish pod has no such variable (``test_eval_publish_spec`` checks
    that), so both the variable and the frozen constant are cleared here.
    """
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with publish_servers(
        tmp_path_factory.mktemp("servers"),
        hub_token=HUB_TOKEN,
        s3_key_id=S3_KEY_ID,
        s3_secret=S3_SECRET,
        registry_user=OCI_USER,
        registry_password=OCI_PASSWORD,
        bucket=BUCKET,
    ) as servers:
        yield servers


def _model(root: Path) -> Path:
    model = root / "out" / "job" / "merged"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(os.urandom(200_000))
    (model / "tokenizer.json").write_text("{}")
    markers.write_marker(model, {"completedAt": "2026-01-01T00:00:00Z"})
    return model


def _config(
    root: Path, model: Path, servers: dict[str, Any], *, repo: str = "org/tiny-chat", tag: str = "v1"
) -> dict[str, Any]:
    data = root / "data.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    base = root / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    registry: Registry = servers["registry"]
    return {
        "modelDir": str(model),
        "artifact": "merged",
        "resultFile": str(root / "publish-result.json"),
        "lineage": {
            "job": {"name": "job", "namespace": "ml"},
            "runId": "r1",
            "specHash": "sha256:abc",
            "baseModel": {"source": None, "path": str(base)},
            "datasets": [{"name": "chat", "path": str(data)}],
            "stages": [{"name": "sft", "type": "sft", "method": "lora", "hyperparameters": {"learning_rate": 1e-4}}],
            "images": {"worker": "ghcr.io/finetune-dev/finetune-worker:0.1.0"},
        },
        "destinations": [
            {
                "name": "hub",
                "type": "huggingface",
                "endpoint": servers["hub"],
                "repoId": repo,
                "private": True,
                "tokenEnv": "FT_PUBLISH_HUB_TOKEN",
            },
            {
                "name": "bucket",
                "type": "s3",
                "endpointUrl": servers["s3"],
                "bucket": BUCKET,
                "prefix": f"{repo}/{tag}",
                "accessKeyIdEnv": "FT_PUBLISH_BUCKET_KEY_ID",
                "secretAccessKeyEnv": "FT_PUBLISH_BUCKET_SECRET",
            },
            {
                "name": "registry",
                "type": "oci",
                "reference": f"{registry.host}/{repo}:{tag}",
                "insecure": True,
                "usernameEnv": "FT_PUBLISH_REGISTRY_USER",
                "passwordEnv": "FT_PUBLISH_REGISTRY_PASSWORD",
                "annotations": {"dev.finetune.run-id": "r1"},
            },
        ],
    }


ENV = {
    "FT_PUBLISH_HUB_TOKEN": HUB_TOKEN,
    "FT_PUBLISH_BUCKET_KEY_ID": S3_KEY_ID,
    "FT_PUBLISH_BUCKET_SECRET": S3_SECRET,
    "FT_PUBLISH_REGISTRY_USER": OCI_USER,
    "FT_PUBLISH_REGISTRY_PASSWORD": OCI_PASSWORD,
}


def _s3_objects(client: Any, prefix: str) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1 :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def _oci_pull(registry: Registry, reference: str, out: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    import oras.container
    import oras.provider

    client = oras.provider.Registry(insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(registry.username, registry.password)
    container = oras.container.Container(reference)
    manifest = client.get_manifest(container, allowed_media_type=[oci.MANIFEST_MEDIA_TYPE])
    client.pull(target=reference, outdir=str(out))
    return manifest, {p.name: p.read_bytes() for p in out.iterdir()}


def _local(model: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model.iterdir() if not p.name.startswith(".")}


def test_publish_to_hub_s3_and_oci_with_lineage_and_idempotence(servers: dict[str, Any], tmp_path: Path) -> None:
    model = _model(tmp_path)
    config = _config(tmp_path, model, servers)
    first = run_publish(config, environ=ENV)

    doc = lineage.read_lineage(model)
    assert doc is not None and doc["runId"] == "r1" and doc["specHash"] == "sha256:abc"
    assert (
        doc["datasets"][0]["files"][0]["sha256"] == hashlib.sha256((tmp_path / "data.jsonl").read_bytes()).hexdigest()
    )
    assert doc["baseModel"]["contentHash"].startswith("sha256:")  # no hub revision: identified by content
    local = _local(model)
    assert set(local) == {"config.json", "model.safetensors", "tokenizer.json", lineage.LINEAGE_FILE}
    assert [(r["name"], r["uploaded"], r["skipped"]) for r in first.destinations] == [
        ("hub", 4, 0),
        ("bucket", 4, 0),
        ("registry", 4, 0),
    ]

    hub_state: HubState = servers["hub_state"]
    repo = hub_state.repos["org/tiny-chat"]
    assert repo.private and repo.files == local and len(repo.commits) == 1
    assert _s3_objects(servers["s3_client"], "org/tiny-chat/v1") == local
    reference = f"{servers['registry'].host}/org/tiny-chat:v1"
    manifest, pulled = _oci_pull(servers["registry"], reference, tmp_path / "pulled")
    assert pulled == local
    assert manifest["artifactType"] == oci.ARTIFACT_TYPES["merged"]
    assert manifest["config"]["mediaType"] == oci.LINEAGE_MEDIA_TYPE
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(local[lineage.LINEAGE_FILE]).hexdigest()
    types = {la["annotations"][oci.TITLE]: la["mediaType"] for la in manifest["layers"]}
    assert types == {
        "config.json": oci.FILE_MEDIA_TYPE,
        "model.safetensors": oci.WEIGHTS_MEDIA_TYPE,
        "tokenizer.json": oci.FILE_MEDIA_TYPE,
        lineage.LINEAGE_FILE: oci.LINEAGE_MEDIA_TYPE,
    }
    assert first.destinations[2]["url"] == f"oci://{reference}"
    recorded = json.loads((tmp_path / "publish-result.json").read_text())
    assert [d["url"] for d in recorded["destinations"]] == [d["url"] for d in first.destinations]

    # A re-run uploads nothing (and the lineage file is not rewritten, so it does not count as changed).
    again = run_publish(config, environ=ENV)
    assert [(r["uploaded"], r["skipped"]) for r in again.destinations] == [(0, 4)] * 3
    assert len(repo.commits) == 1
    assert again.destinations[2]["digest"] == first.destinations[2]["digest"]

    # A changed file is the only one uploaded again.
    (model / "tokenizer.json").write_text('{"changed": true}')
    changed = run_publish(config, environ=ENV)
    assert [(r["uploaded"], r["skipped"]) for r in changed.destinations] == [(1, 3)] * 3
    assert repo.files["tokenizer.json"] == b'{"changed": true}'

    blob = json.dumps(recorded) + json.dumps(doc)
    assert not any(s in blob for s in SECRETS)


@pytest.mark.parametrize(
    ("destination", "wrong", "expected"),
    [
        ("hub", {"FT_PUBLISH_HUB_TOKEN": "hf_wrong_token_canary"}, "401"),
        ("bucket", {"FT_PUBLISH_BUCKET_SECRET": ""}, "S3 credential secretAccessKey is missing"),
        ("registry", {"FT_PUBLISH_REGISTRY_PASSWORD": "wrong-password-canary"}, "refused the credentials"),
    ],
)
def test_bad_credentials_fail_clearly_without_leaking(
    servers: dict[str, Any], tmp_path: Path, destination: str, wrong: dict[str, str], expected: str
) -> None:
    model = _model(tmp_path)
    config = _config(tmp_path, model, servers, repo="org/denied")
    config["destinations"] = [d for d in config["destinations"] if d["name"] == destination]
    env = {**ENV, **wrong}
    with pytest.raises(PublishError, match=expected) as info:
        run_publish(config, environ=env)
    assert info.value.exit_code == 10
    assert f"destination '{destination}'" in str(info.value)
    assert not any(s and s in str(info.value) for s in (*SECRETS, *wrong.values()))


def test_missing_bucket_is_a_clear_error(servers: dict[str, Any], tmp_path: Path) -> None:
    model = _model(tmp_path)
    config = _config(tmp_path, model, servers)
    config["destinations"] = [{**config["destinations"][1], "bucket": "no-such-bucket"}]
    with pytest.raises(PublishError, match="bucket 'no-such-bucket' is not accessible"):
        run_publish(config, environ=ENV)


def test_ftctl_worker_publish_and_lineage(servers: dict[str, Any], tmp_path: Path) -> None:
    model = _model(tmp_path)
    config = _config(tmp_path, model, servers, repo="org/cli", tag="v2")
    cfg = tmp_path / "publish.json"
    cfg.write_text(json.dumps(config))
    env = {**ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FT_TERMINATION_LOG": str(tmp_path / "term")}
    (tmp_path / "term").write_text("")
    proc = subprocess.run(
        [FTCTL, "worker", "publish", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "published: oci://" in proc.stdout
    assert not any(s in proc.stdout + proc.stderr for s in SECRETS)

    shown = subprocess.run([FTCTL, "lineage", str(model)], capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["runId"] == "r1"
    missing = subprocess.run([FTCTL, "lineage", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1 and "no finetune-lineage.json" in missing.stderr

    denied = {**env, "FT_PUBLISH_REGISTRY_PASSWORD": "wrong-password-canary"}
    failed = subprocess.run(
        [FTCTL, "worker", "publish", "--config", str(cfg)],
        env=denied,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert failed.returncode == 10
    assert "refused the credentials" in (tmp_path / "term").read_text()
    assert "wrong-password-canary" not in failed.stderr + failed.stdout
