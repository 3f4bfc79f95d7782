"""End to end through the containers: evaluate, gate and publish, and a missing Secret caught before training.

`kubectl apply -f` the local eval/publish demo (manifests/examples/local-demo-eval-publish.yaml: LoRA SFT,
merge, held-out loss and generation metrics, a gate on eval_loss, publish to a hub, S3 and an OCI registry)
into the emulated cluster; the operator (started as the chart starts it) drives it and the node agent runs
every pod in the worker image (tests/node_agent). The publish destinations are real servers on 127.0.0.1:
the hub stand-in (tests/hub_standin.py), moto's S3 server and Debian's docker-registry
(tests/publish_servers.py); their credentials are Secrets of the namespace holding canaries.

Asserted: ``kubectl wait --for=condition=Ready``; the metrics the operator read from the eval pod's
termination message (the node agent writes Pod objects as the kubelet does) in ``status.stages[]``,
``status.outputs.metrics``, ``status.gate`` and the ``METRIC`` column; the three copies exist, each with
``finetune-lineage.json`` and the merged model's files, as recorded in ``status.outputs.published``; the
canaries are in no object but their Secrets, in no container log and not in the operator's log. And: a job
whose publish Secret lacks a key fails with ``SecretNotFound`` before its training step was created (the
preflight pod's ``check-secrets`` init container cannot be created; the kubelet says why).

Then a failing gate: the job serves the model with vLLM (in its image); a new run (``spec.runId``) whose gate
the model misses ends ``Failed`` with reason ``GateFailed``, publishes nothing, and leaves the old model
serving (the Deployment untouched, ``Ready`` true, a chat completion still answered).
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from finetune_operator.api import constants as c
from finetune_operator.render import secretcheck
from finetune_operator.worker import lineage
from tests.e2e_harness import NS, Cluster, build_images
from tests.e2e_harness import cluster as start_cluster
from tests.install_tools import ROOT
from tests.node_agent import available
from tests.publish_servers import publish_servers
from tests.test_e2e import chat, stop_serving
from tests.test_local_run import shared_tiny_model
from tests.test_publish import _oci_pull

pytestmark = [pytest.mark.e2e, pytest.mark.train, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

EXAMPLE = ROOT / "manifests" / "examples" / "local-demo-eval-publish.yaml"
HUB_CANARY = "hf_E2E-PUBLISH-CANARY-9c2e71d04b"
SECRETS = {
    "hub-token": {"token": HUB_CANARY},
    "s3-credentials": {"accessKeyId": "AKIAE2ECANARY0000042", "secretAccessKey": "s3-e2e-canary-secret-60fb1d2a"},
    "registry-credentials": {"username": "publisher", "password": "oci-e2e-canary-password-83d7c5"},
}
CANARIES = [HUB_CANARY, *(v for keys in SECRETS.values() for k, v in keys.items() if k != "username")]
DOWNLOAD_CANARY = "hf_E2E-EVALPUB-DOWNLOAD-CANARY-5d1f0a"
BUCKET = "models"


@pytest.fixture(scope="module")
def images() -> None:
    why = available()
    if why:
        pytest.skip(f"containers cannot run here: {why}")
    proc = build_images("worker", "vllm")
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    creds, s3c = SECRETS["registry-credentials"], SECRETS["s3-credentials"]
    with publish_servers(
        tmp_path_factory.mktemp("e2e-publish-servers"),
        hub_token=HUB_CANARY,
        s3_key_id=s3c["accessKeyId"],
        s3_secret=s3c["secretAccessKey"],
        registry_user=creds["username"],
        registry_password=creds["password"],
        bucket=BUCKET,
    ) as servers:
        yield servers


@pytest.fixture(scope="module")
def cluster(images: None, servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model = shared_tiny_model(tmp_path_factory)
    with start_cluster(tmp_path_factory.mktemp("e2e-evalpub"), model, DOWNLOAD_CANARY) as cl:
        # The base model on its volume (no download step: the first Job is the preflight, which checks the
        # Secrets), the publish credentials as `kubectl create secret generic` stores them.
        shutil.copytree(model, cl.claim("demo-models") / "tiny-qwen2")
        for name, keys in SECRETS.items():
            cl.server.create(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": NS},
                    "type": "Opaque",
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()},
                }
            )
        yield cl


def spec(name: str, servers: dict[str, Any]) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": NS}
    dests = doc["spec"]["publish"]["destinations"]
    dests[0]["huggingface"]["repoId"] = f"demo/{name}"
    dests[0]["huggingface"]["endpoint"] = servers["hub"]
    dests[1]["s3"]["prefix"] = name
    dests[1]["s3"]["endpointUrl"] = servers["s3"]
    dests[2]["oci"]["reference"] = f"{servers['registry'].host}/demo/{name}:v1"
    doc["spec"]["retries"] = 0
    return dict(doc)


#: vLLM's CPU build serving the merged model (as manifests/examples/local-demo-serve.yaml does).
SERVE = {
    "enabled": True,
    "servedModelName": "tiny-evalpub",
    "maxModelLen": 512,
    "resources": {"gpusPerNode": 0},
    "args": ["--dtype", "float32", "--enforce-eager"],
    "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
}


def apply(cluster: Cluster, doc: dict[str, Any]) -> None:
    path = cluster.root / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cluster.kubectl("apply", "-f", str(path))


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((x for x in status.get("conditions") or [] if x["type"] == type_), {})


def warnings(cluster: Cluster, name: str, reason: str) -> list[str]:
    """The types of the job's events with ``reason``, once there is one (events are posted after the status)."""

    def found() -> list[str] | None:
        events = [e for e in cluster.server.list("events", NS) if e["involvedObject"]["name"] == name]
        return [e["type"] for e in events if e["reason"] == reason] or None

    return cluster.server.wait_for(found, 30, f"no {reason} event about {name}")


def test_missing_publish_secret_fails_before_training(cluster: Cluster, servers: dict[str, Any]) -> None:
    name = "e2e-nosecret"
    doc = spec(name, servers)
    doc["spec"]["publish"]["destinations"][2]["oci"]["passwordSecretRef"]["key"] = "no-such-key"
    apply(cluster, doc)
    cluster.kubectl("wait", "--for=condition=Failed", f"ftj/{name}", "--timeout=300s", timeout=330)
    failed = condition(cluster.status(name), "Failed")
    assert failed["reason"] == c.Reason.SECRET_NOT_FOUND, failed
    assert "spec.publish.destinations[2].oci.passwordSecretRef" in failed["message"], failed
    assert f"couldn't find key no-such-key in Secret {NS}/registry-credentials" in failed["message"], failed
    # Nothing ran but the check's pod, which never started a container; no training workload exists.
    assert not [r for r in cluster.agent.records if r.pod.startswith(name)]
    jobs = [
        j["metadata"]["name"] for j in cluster.server.list("jobs.batch", NS) if j["metadata"]["name"].startswith(name)
    ]
    assert f"{name}-sft" not in jobs, jobs
    assert warnings(cluster, name, c.Reason.SECRET_NOT_FOUND) == ["Warning"]
    cluster.kubectl("delete", "ftj", name, "--wait=false")


def test_eval_gate_publish_serve_then_a_failing_gate_keeps_it_serving(
    cluster: Cluster, servers: dict[str, Any]
) -> None:
    name = "e2e-evalpub"
    job = spec(name, servers)
    job["spec"]["serve"] = SERVE
    apply(cluster, job)
    cluster.kubectl("wait", "--for=condition=Ready", f"ftj/{name}", "--timeout=900s", timeout=960)
    status = cluster.status(name)
    assert status["state"] == "Serving", status

    # The Secret check ran first, in the preflight pod (an init container that read and printed nothing).
    check = [
        r
        for r in cluster.agent.records
        if r.pod.startswith(f"{name}-preflight") and r.container == secretcheck.CONTAINER
    ]
    assert len(check) == 1 and check[0].exit_code == 0 and check[0].argv == ["true"], check

    # Metrics: from the eval pod's termination message (the Pod object the node agent wrote) into status.
    stage = next(s for s in status["stages"] if s["name"] == "eval")
    metrics = stage["metrics"]
    assert metrics["eval_loss"] > 0 and {"predict_bleu-4", "predict_rouge-1"} <= set(metrics), metrics
    assert status["outputs"]["metrics"] == metrics
    assert status["gate"]["result"] == "Passed" and status["gate"]["value"] == metrics["eval_loss"], status["gate"]
    assert status["metric"] == f"eval_loss={metrics['eval_loss']:.4g}"
    row = cluster.kubectl("get", "ftj", name).stdout
    assert f"eval_loss={metrics['eval_loss']:.4g}" in row, row
    eval_pods = [
        p for p in cluster.server.list("pods", NS) if p["metadata"]["labels"].get("job-name") == f"{name}-eval"
    ]
    assert (
        eval_pods
        and json.loads(eval_pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"])["metrics"]
        == metrics
    )

    # The merged model and its lineage on the output volume.
    merged = cluster.claim("demo-outputs") / name / "merged"
    doc = lineage.read_lineage(merged)
    assert doc is not None and doc["metrics"]["eval_loss"] == metrics["eval_loss"]
    local = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert "finetune-lineage.json" in local and "config.json" in local

    # Three copies, each with the lineage, where status says they went.
    published = {p["name"]: p for p in status["outputs"]["published"]}
    assert set(published) == {"hub", "bucket", "registry"}, published
    repo = servers["hub_state"].repos[f"demo/{name}"]
    assert repo.files == local and repo.private
    client = servers["s3_client"]
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{name}/")["Contents"]
    s3_files = {
        o["Key"][len(name) + 1 :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing
    }
    assert s3_files == local
    reference = f"{servers['registry'].host}/demo/{name}:v1"
    manifest, pulled = _oci_pull(servers["registry"], reference, cluster.root / "oci-pull")
    assert pulled["finetune-lineage.json"] == local["finetune-lineage.json"] and set(pulled) == set(local)
    assert published["registry"]["url"] == f"oci://{reference}" and published["registry"]["digest"], published
    assert manifest["artifactType"] == "application/vnd.finetune.dev.model.v1"

    # The canaries: used (the hub saw the token) and nowhere else.
    assert repo.commits
    for (_group, plural), obj in cluster.server.emulator.iter_all():
        if plural != "secrets":
            text = json.dumps(obj)
            assert not any(x in text for x in CANARIES), f"a canary leaked into a {plural}: {obj['metadata']['name']}"
    for rec in cluster.agent.records:
        text = rec.log_path.read_text(errors="replace")
        assert not any(x in text for x in CANARIES), f"a canary is in {rec.log_path.name}"
    operator_log = cluster.operator_log.read_text(errors="replace")
    assert not any(x in operator_log for x in CANARIES)

    # The model serves, and the Deployment carries the metrics it passed the gate with.
    assert chat("tiny-evalpub")["model"] == "tiny-evalpub"
    deployment = cluster.server.get("deployments.apps", f"{name}-serve", NS)
    assert deployment is not None
    assert json.loads(deployment["metadata"]["annotations"][c.ANNOTATION_METRICS])["eval_loss"] == metrics["eval_loss"]

    # A new run whose model misses the gate: nothing published, the old model goes on serving.
    commits, s3_before = list(repo.commits), dict(s3_files)
    job["spec"]["runId"] = "strict"
    job["spec"]["gate"]["threshold"] = 0.0001
    apply(cluster, job)
    cluster.kubectl("wait", "--for=condition=Failed", f"ftj/{name}", "--timeout=900s", timeout=960)
    status = cluster.status(name)
    failed = condition(status, "Failed")
    assert failed["reason"] == c.Reason.GATE_FAILED and "misses the threshold" in failed["message"], failed
    assert status["gate"]["result"] == "Failed" and status["gate"]["value"] > 0.0001, status["gate"]
    ready = condition(status, "Ready")
    assert ready["status"] == "True", ready  # the previous run's model is served
    assert f"{name}-strict-eval" in {j["metadata"]["name"] for j in cluster.server.list("jobs.batch", NS)}
    assert cluster.server.get("jobs.batch", f"{name}-strict-publish", NS) is None
    after = cluster.server.get("deployments.apps", f"{name}-serve", NS)
    assert after is not None and after["metadata"]["generation"] == deployment["metadata"]["generation"]
    assert after["spec"]["template"] == deployment["spec"]["template"]
    assert chat("tiny-evalpub")["model"] == "tiny-evalpub"
    assert repo.commits == commits
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{name}/")["Contents"]
    assert {o["Key"][len(name) + 1 :] for o in listing} == set(s3_before)
    assert warnings(cluster, name, c.Reason.GATE_FAILED) == ["Warning"]
    stop_serving(cluster, name)
