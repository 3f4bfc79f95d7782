"""End to end: `kubectl apply -f` a FineTuneJob; every pod the operator renders runs in its image.

The operator (started as the chart's Deployment starts it) drives download → SFT → DPO → merge → serve
against the API-server emulator; the node agent (tests/node_agent) runs each pod's containers with
``buildah run`` in the images built by scripts/build-images.sh and writes back the workload status the real
controllers would. The model comes from a stand-in hub that answers only with the token of the Secret.

Asserted: ``kubectl wait --for=condition=Ready`` succeeds; the vLLM container at the endpoint answers a chat
completion under ``servedModelName``; every container ran as the UID its pod spec says (and wrote its files
as that UID); the token is in no ConfigMap, status, event or container log; re-applying the spec creates
nothing; (``job`` backend) a training container killed with SIGKILL mid-stage is retried and resumes from
its last complete checkpoint.

Needs root, buildah and the images (CI builds them: scripts/test.sh runs scripts/build-images.sh first; the
fixture runs it too, a no-op when nothing changed). One shared tiny model, tiny step counts: CI time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from finetune_operator.worker.train import checkpoints, is_complete_checkpoint
from tests.e2e_harness import NS, REPO, TOKEN_SECRET, Cluster, build_images
from tests.e2e_harness import cluster as start_cluster
from tests.install_tools import ROOT
from tests.node_agent import available
from tests.node_agent.trainjob import runtime_of, trainer_job
from tests.test_local_run import shared_tiny_model

#: Each test drives a whole pipeline in containers (minutes on 2 loaded cores); the images are built before.
#: They train with LLaMA-Factory and serve with vLLM, so `-m "not train and not vllm"` leaves them out too.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.train,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]

CANARY = "hf_E2E-CANARY-4b1d9e7a-never-print-me"
VLLM_PORT = 8000


@pytest.fixture(scope="module")
def images() -> None:
    why = available()
    if why:
        pytest.skip(f"containers cannot run here: {why}")
    proc = build_images("worker", "vllm")
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def cluster(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("e2e"), shared_tiny_model(tmp_path_factory), CANARY) as c:
        yield c


def spec(name: str, backend: str, nodes: int = 1) -> dict[str, Any]:
    """The local demo with serving (manifests/examples/local-demo-serve.yaml), from the stand-in hub, tiny."""
    doc = yaml.safe_load((ROOT / "manifests/examples/local-demo-serve.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name, "namespace": NS}
    s = doc["spec"]
    s["backend"] = backend
    s["model"]["source"] = REPO
    s["model"]["tokenSecretRef"] = dict(TOKEN_SECRET)
    s["model"]["volume"] = {"claimName": "models", "subPath": name}
    s["retries"] = 1
    for stage in s["stages"]:
        stage["resources"] = {"nodes": nodes, "gpusPerNode": 0}
    s["stages"][0]["args"].update(max_steps=6, save_steps=2)
    s["stages"][1]["args"].update(max_steps=2, save_steps=2)
    return doc


def apply(cluster: Cluster, doc: dict[str, Any]) -> str:
    path = cluster.root / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cluster.kubectl("apply", "-f", str(path)).stdout


def chat(model: str) -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{VLLM_PORT}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return dict(json.loads(resp.read()))


def workloads(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every object the operator created (uid -> object), events excluded."""
    out = {}
    for (group, plural), obj in cluster.server.emulator.iter_all():
        if plural in ("events", "namespaces", "customresourcedefinitions") or group == "finetune.dev":
            continue
        if obj.get("metadata", {}).get("namespace") == NS and plural != "secrets":
            out[obj["metadata"]["uid"]] = obj
    return out


def pod_users(cluster: Cluster) -> dict[str, str]:
    """Pod template name prefix -> the UID:GID its spec says (runAsUser/runAsGroup; root when unset)."""
    wanted = {}
    for obj in workloads(cluster).values():
        templates = []
        spec_ = obj.get("spec") or {}
        if "template" in spec_:
            templates.append((obj["metadata"]["name"], spec_["template"]))
        for role, rs in (spec_.get("pytorchReplicaSpecs") or {}).items():
            templates.append((f"{obj['metadata']['name']}-{role.lower()}", rs["template"]))
        if "worker" in spec_:  # DeepSpeedJob: the workers and T9k's launcher share the template
            templates.append((obj["metadata"]["name"], spec_["worker"]["template"]))
        if obj.get("kind") == "TrainJob":  # the node pods of the JobSet built from the runtime and its patches
            runtime = runtime_of(cluster.server, obj)
            assert runtime is not None
            node = trainer_job(obj, runtime, master_port=0)
            templates.append((node.name, node.template))
        for name, tpl in templates:
            sc = tpl["spec"].get("securityContext") or {}
            csc = tpl["spec"]["containers"][0].get("securityContext") or {}
            uid = csc.get("runAsUser", sc.get("runAsUser"))
            gid = csc.get("runAsGroup", sc.get("runAsGroup"))
            wanted[name] = f"{uid}:{gid if gid is not None else 0}" if uid is not None else "image"
    return wanted


def assert_common(cluster: Cluster, name: str, served: str) -> None:
    """Ready, served, UIDs, the token nowhere, re-apply creates nothing."""
    status = cluster.status(name)
    endpoint = status["outputs"]["endpoint"]
    assert endpoint == f"http://{name}-serve.{NS}.svc:{VLLM_PORT}/v1"
    # Ready came after the operator's chat completion through the Service proxy reached the vLLM container.
    ready = next(x for x in status["conditions"] if x["type"] == "Ready")
    assert ready["message"] == "the vLLM Deployment is available and its Service answered a chat completion", ready
    proxied = [r for r in cluster.server.emulator.request_log if r.subresource == "proxy" and r.name == f"{name}-serve"]
    assert proxied and all(r.verb == "create" for r in proxied)
    # The Service name resolves to this machine (shared network): the container answers under servedModelName.
    answer = chat(served)
    assert answer["model"] == served and answer["choices"][0]["message"]["content"] is not None
    # Every container ran as the UID its pod spec says ...
    wanted = pod_users(cluster)
    records = [r for r in cluster.agent.records if r.pod.startswith(name)]
    assert records
    for rec in records:
        prefix = max((p for p in wanted if rec.pod.startswith(p)), key=len)
        assert rec.user == wanted[prefix] or (wanted[prefix] == "image" and rec.user), (rec, wanted[prefix])
    # ... and the files they wrote are owned by it (the kernel's word, not the agent's).
    out = cluster.claim("demo-outputs") / name
    merged = out / "merged"
    assert (merged / "config.json").is_file()
    assert (merged / "config.json").stat().st_uid == 65532
    model_dir = cluster.claim("models") / name
    assert (model_dir / "config.json").stat().st_uid == 65532
    # The token: used (the hub saw it) and nowhere else.
    assert any(ok for _m, _p, ok in cluster.hub.requests)
    for (_group, plural), obj in cluster.server.emulator.iter_all():
        if plural != "secrets":
            assert CANARY not in json.dumps(obj), f"the token leaked into a {plural}: {obj['metadata']['name']}"
    for rec in records:
        assert CANARY not in rec.log_path.read_text(errors="replace"), f"the token is in {rec.log_path.name}"
    assert CANARY not in cluster.operator_log.read_text(errors="replace")
    # Re-applying the same spec changes nothing and creates nothing.
    before = set(workloads(cluster))
    out_text = apply(cluster, spec_for[name])
    assert "unchanged" in out_text
    cluster.server.wait_for(lambda: cluster.status(name).get("state") == "Serving", 30)
    assert set(workloads(cluster)) == before


spec_for: dict[str, dict[str, Any]] = {}


def stop_serving(cluster: Cluster, name: str) -> None:
    """Delete the job (its Deployment goes with it) so that the next backend's vLLM can bind the port."""
    deployment = cluster.server.get("deployments.apps", f"{name}-serve", NS)
    assert deployment is not None
    cluster.kubectl("delete", "ftj", name, "--wait=false")
    cluster.server.wait_for(lambda: cluster.server.get("deployments.apps", f"{name}-serve", NS) is None, 60)
    for proc in cluster.agent.processes(deployment["metadata"]["uid"]):
        proc.popen.wait(60)


#: SFT steps of the job-backend run, whose training container is killed mid-run.
SFT_STEPS = 120


def test_job_backend_end_to_end(cluster: Cluster) -> None:
    name = "e2e-job"
    doc = spec(name, "job")
    # Long enough that the kill below lands mid-run whatever the machine's load: six steps take a fraction of a
    # second on CPU, less than it takes to see a report and send the signal.
    doc["spec"]["stages"][0]["args"].update(max_steps=SFT_STEPS, save_steps=10)
    spec_for[name] = doc
    apply(cluster, doc)

    # SIGKILL the SFT container once a checkpoint is complete (the worker reports step 12 only after
    # checkpoint-10 was written).
    def reported_step() -> int:
        return int(((cluster.status(name).get("reported") or {}).get("sft") or {}).get("step") or 0)

    sft_job = cluster.server.wait_for(
        lambda: cluster.server.get("jobs.batch", f"{name}-sft", NS), 600, "the SFT Job never appeared"
    )
    cluster.server.wait_for(lambda: reported_step() >= 12, 600, "SFT never reported step 12")
    procs = cluster.agent.processes(sft_job["metadata"]["uid"])
    assert procs, "the SFT container is not running"
    for proc in procs:
        for pid in proc.inner_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for proc in procs:
        proc.popen.wait(60)
    # What the killed container left: the retry must resume from the newest complete checkpoint.
    out = cluster.claim("demo-outputs") / name / "sft"
    complete = [step for step, path in checkpoints(out) if is_complete_checkpoint(path)]
    assert complete, "no complete checkpoint before the kill"
    # The Job fails (exit 137, backoffLimit 0), the operator retries the stage, the worker resumes.
    cluster.kubectl("wait", "--for=condition=Ready", f"ftj/{name}", "--timeout=900s", timeout=960)
    status = cluster.status(name)
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert sft["attempts"] == 2, sft
    sft_logs = [r for r in cluster.agent.records if r.pod.startswith(f"{name}-sft")]
    assert len(sft_logs) == 2 and sft_logs[0].exit_code == 137, [(r.pod, r.exit_code) for r in sft_logs]
    resumed = re.search(r"resuming from .*checkpoint-(\d+)", sft_logs[1].log_path.read_text())
    assert resumed, sft_logs[1].log_path.read_text()[-3000:]
    assert int(resumed.group(1)) == max(complete), (resumed.group(0), complete)
    assert max(complete) < SFT_STEPS, "the kill came after the last step: nothing was resumed mid-run"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == SFT_STEPS
    assert_common(cluster, name, "tiny-chat")
    stop_serving(cluster, name)


def test_pytorchjob_backend_end_to_end(cluster: Cluster) -> None:
    """Two nodes (Master + Worker) for both stages, with the training-operator's environment."""
    name = "e2e-ptj"
    doc = spec(name, "pytorchjob", nodes=2)
    spec_for[name] = doc
    apply(cluster, doc)
    cluster.kubectl("wait", "--for=condition=Ready", f"ftj/{name}", "--timeout=900s", timeout=960)
    for stage in ("sft", "dpo"):
        pods = {r.pod for r in cluster.agent.records if r.pod.startswith(f"{name}-{stage}-")}
        assert pods == {f"{name}-{stage}-master-0", f"{name}-{stage}-worker-0"}, pods
    marker = json.loads((cluster.claim("demo-outputs") / name / "sft" / ".finetune-complete.json").read_text())
    assert marker["writer"]["nnodes"] == 2 and marker["writer"]["backend"] == "pytorchjob"
    assert_common(cluster, name, "tiny-chat")
    stop_serving(cluster, name)


def test_deepspeedjob_backend_end_to_end(cluster: Cluster) -> None:
    """Two workers with sshd, DeepSpeed's launcher over SSH (pdsh), ZeRO-2, as T9k's controller runs it."""
    name = "e2e-dsj"
    doc = spec(name, "deepspeedjob", nodes=2)
    for stage in doc["spec"]["stages"]:
        stage["deepspeed"] = {"zeroStage": 2}
    spec_for[name] = doc
    apply(cluster, doc)
    cluster.kubectl("wait", "--for=condition=Ready", f"ftj/{name}", "--timeout=900s", timeout=960)
    for stage in ("sft", "dpo"):
        pods = {r.pod for r in cluster.agent.records if r.pod.startswith(f"{name}-{stage}-")}
        assert pods == {f"{name}-{stage}-worker-0", f"{name}-{stage}-worker-1", f"{name}-{stage}-launcher"}, pods
    out = cluster.claim("demo-outputs") / name / "sft"
    marker = json.loads((out / ".finetune-complete.json").read_text())
    assert marker["writer"]["backend"] == "deepspeedjob"
    launcher = next(r for r in cluster.agent.records if r.pod == f"{name}-sft-launcher")
    log = launcher.log_path.read_text(errors="replace")
    assert f"{name}-sft-worker-1" in log and launcher.exit_code == 0  # the runner reached both hosts
    assert_common(cluster, name, "tiny-chat")
    stop_serving(cluster, name)


def test_trainjob_backend_end_to_end(cluster: Cluster) -> None:
    """Kubeflow Trainer v2: two nodes for both stages, the TrainJob on the torch-distributed runtime as Trainer,
    JobSet and the Job controller run it (the pods, the torch plugin's environment, the status they write)."""
    name = "e2e-tj"
    doc = spec(name, "trainjob", nodes=2)
    spec_for[name] = doc
    apply(cluster, doc)
    cluster.kubectl("wait", "--for=condition=Ready", f"ftj/{name}", "--timeout=900s", timeout=960)
    for stage in ("sft", "dpo"):
        pods = {r.pod.rsplit("-", 1)[0] for r in cluster.agent.records if r.pod.startswith(f"{name}-{stage}-")}
        assert pods == {f"{name}-{stage}-node-0-0", f"{name}-{stage}-node-0-1"}, pods
        trainjob = cluster.server.get("trainjobs.trainer.kubeflow.org", f"{name}-{stage}", NS)
        assert trainjob is not None
        conditions = {c["type"]: c["reason"] for c in trainjob["status"]["conditions"] if c["status"] == "True"}
        assert conditions == {"Complete": "AllJobsCompleted"}, conditions
    marker = json.loads((cluster.claim("demo-outputs") / name / "sft" / ".finetune-complete.json").read_text())
    assert marker["writer"]["nnodes"] == 2 and marker["writer"]["backend"] == "trainjob"
    # Rank 1 reached rank 0 at the JobSet DNS name the torch plugin gives as PET_MASTER_ADDR.
    rank1 = next(r for r in cluster.agent.records if r.pod.startswith(f"{name}-sft-node-0-1-"))
    assert f"{name}-sft-node-0-0.{name}-sft" in rank1.log_path.read_text(errors="replace")
    assert_common(cluster, name, "tiny-chat")
    stop_serving(cluster, name)
