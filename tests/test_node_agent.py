"""The node agent's kubelet and controllers on small pods (the Python base image, seconds each).

What the e2e tests rely on, checked where a failure is cheap to read: Indexed Jobs (index env, pod DNS
names), exit codes to Job conditions (backoffLimit, podFailurePolicy, SIGKILL → 137), users, volumes
(PVC, ConfigMap, emptyDir, subPath, readOnly, fsGroup), Secrets and fieldRefs in env, and a Deployment whose
readiness probe decides availableReplicas.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.emulator import EmulatorServer
from tests.install_tools import ROOT
from tests.node_agent import NodeAgent, available

pytestmark = [pytest.mark.e2e]

IMAGE = "localhost/finetune-base-python:3.11"
NS = "default"


@pytest.fixture(scope="module")
def base_image() -> None:
    why = available()
    if why:
        pytest.skip(f"containers cannot run here: {why}")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), "base"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture()
def agent(base_image: None, emulator_server: EmulatorServer, tmp_path: Path) -> Iterator[NodeAgent]:
    node = NodeAgent(emulator_server, tmp_path / "node", node_env={"NODE_LEVEL": "yes"}).start()
    try:
        yield node
    finally:
        node.stop()
    assert not node.errors, node.errors


def job(name: str, script: str, **spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
        "containers": [
            {
                "name": "main",
                "image": IMAGE,
                "command": ["sh", "-c", script],
                "env": spec.pop("env", []),
                "volumeMounts": spec.pop("mounts", []),
                "workingDir": "/tmp",
            }
        ],
        "volumes": spec.pop("volumes", []),
    }
    if "subdomain" in spec:
        pod_spec["subdomain"] = spec.pop("subdomain")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}, **spec},
    }


def finished(server: EmulatorServer, name: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> Any:
        obj = server.get("jobs.batch", name, NS) or {}
        conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
        return obj["status"] if "Complete" in conds or "Failed" in conds else None

    return dict(server.wait_for(done, timeout, f"Job {name} never finished"))


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["reason"] for c in status.get("conditions") or []}


def test_indexed_job_volumes_env_and_users(agent: NodeAgent, emulator_server: EmulatorServer) -> None:
    emulator_server.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s", "namespace": NS},
            "data": {"k": base64.b64encode(b"from-secret").decode()},
        }
    )
    emulator_server.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cm", "namespace": NS},
            "data": {"a.yaml": "x: 1\n"},
        }
    )
    emulator_server.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "peers", "namespace": NS},
            "spec": {"clusterIP": "None"},
        }
    )
    data = agent.kubelet.claim_dir(NS, "data")
    (data / "in").mkdir()
    (data / "in" / "x.txt").write_text("input")
    script = (
        "set -e; i=$JOB_COMPLETION_INDEX; out=/mnt/out/$i; "
        'printf "%s\\n" "$(id -u):$(id -g)" "$S" "$POD" "$NODE_LEVEL" "$(cat /etc/cfg/a.yaml)" "$(cat /mnt/in/x.txt)" '
        '"$(pwd)" > $out; '
        "getent hosts ev-0.peers >> $out; getent hosts ev-1.peers.default.svc >> $out; "
        "touch /tmp/scratch /dev/shm/s; ! touch /mnt/in/nope 2>/dev/null"
    )
    emulator_server.create(
        job(
            "ev",
            script,
            completionMode="Indexed",
            completions=2,
            parallelism=2,
            subdomain="peers",
            env=[
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            volumes=[
                {"name": "d", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "c", "configMap": {"name": "cm"}},
                {"name": "t", "emptyDir": {}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
            mounts=[
                {"name": "d", "mountPath": "/mnt/out", "subPath": "out"},
                {"name": "d", "mountPath": "/mnt/in", "subPath": "in", "readOnly": True},
                {"name": "c", "mountPath": "/etc/cfg", "readOnly": True},
                {"name": "t", "mountPath": "/tmp"},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
        )
    )
    status = finished(emulator_server, "ev")
    assert "Complete" in conditions(status) and status["succeeded"] == 2
    for i in (0, 1):
        lines = (data / "out" / str(i)).read_text().splitlines()
        uid, secret, pod, node_level, cfg, inp, cwd = lines[:7]
        assert (uid, secret, node_level, cfg) == ("65532:65532", "from-secret", "yes", "x: 1")
        assert (inp, cwd) == ("input", "/tmp")
        assert pod.startswith(f"ev-{i}-")
        assert all(line.startswith("127.0.0.1") for line in lines[7:9]) and len(lines) == 9, lines
        assert (data / "out" / str(i)).stat().st_uid == 65532
    assert (data / "out").stat().st_gid == 65532  # fsGroup
    assert {r.user for r in agent.records} == {"65532:65532"}


def test_exit_codes_to_job_conditions(agent: NodeAgent, emulator_server: EmulatorServer) -> None:
    policy = {
        "rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]}}]
    }
    emulator_server.create(job("permanent", "exit 3", backoffLimit=5, podFailurePolicy=policy))
    emulator_server.create(job("retried", "exit 7", backoffLimit=1))
    emulator_server.create(job("killed", "kill -9 $$", backoffLimit=0))
    assert conditions(finished(emulator_server, "permanent"))["Failed"] == "PodFailurePolicy"
    retried = finished(emulator_server, "retried")
    assert conditions(retried)["Failed"] == "BackoffLimitExceeded" and retried["failed"] == 2
    assert conditions(finished(emulator_server, "killed"))["Failed"] == "BackoffLimitExceeded"
    codes = {r.pod.rsplit("-", 1)[0]: r.exit_code for r in agent.records}
    assert codes == {"permanent": 3, "retried": 7, "killed": 137}


def test_suspended_job_waits(agent: NodeAgent, emulator_server: EmulatorServer) -> None:
    emulator_server.create(job("later", "true", suspend=True))
    emulator_server.create(job("marker", "true"))
    finished(emulator_server, "marker")
    assert not [r for r in agent.records if r.pod.startswith("later")]
    emulator_server.patch("jobs.batch", "later", {"spec": {"suspend": False}}, NS)
    assert "Complete" in conditions(finished(emulator_server, "later"))


def test_deployment_is_available_once_its_probe_answers(agent: NodeAgent, emulator_server: EmulatorServer) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    container = {
        "name": "web",
        "image": IMAGE,
        "command": ["sh", "-c", f"sleep 2; exec python -m http.server {port}"],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    emulator_server.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "metadata": {"labels": {"a": "b"}},
                    "spec": {"securityContext": {"runAsUser": 1000}, "containers": [container]},
                },
            },
        }
    )

    def available_replicas() -> int:
        return int(
            ((emulator_server.get("deployments.apps", "web", NS) or {}).get("status") or {}).get("availableReplicas")
            or 0
        )

    service = {"selector": {"a": "b"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}
    emulator_server.create(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS}, "spec": service}
    )
    emulator_server.wait_for(lambda: available_replicas() == 1, 60, "never available")
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        assert resp.status == 200
    # The Service reaches the ready pod through the API server's Service proxy (the agent plays kube-proxy).
    proxied = f"{emulator_server.url}/api/v1/namespaces/{NS}/services/web:80/proxy/"
    with urllib.request.urlopen(proxied, timeout=10) as resp:
        assert resp.status == 200
    assert [r.user for r in agent.records] == ["1000:0"]
    emulator_server.delete("deployments.apps", "web", NS)
    emulator_server.wait_for(lambda: not agent.processes_of_kind("Deployment"), 30, "the pod outlived its Deployment")


def pods_of(server: EmulatorServer, job_name: str) -> list[dict[str, Any]]:
    return [p for p in server.list("pods", NS) if p["metadata"]["labels"].get("job-name") == job_name]


def test_pod_objects_with_termination_messages(agent: NodeAgent, emulator_server: EmulatorServer) -> None:
    """The Job's pod as the Job controller and the kubelet write it: labels, owner, phase, container states with
    the termination message (what the operator reads eval/publish results from), init containers first."""
    from finetune_operator.controller import results

    doc = job("term", 'test -f /tmp/init-ran || true; printf \'{"metrics": {"x": 1.5}}\' > "$FT_TERMINATION_LOG"')
    spec = doc["spec"]["template"]["spec"]
    doc["spec"]["template"]["metadata"] = {"labels": {"app.kubernetes.io/managed-by": "finetune-operator"}}
    spec["initContainers"] = [{"name": "first", "image": IMAGE, "command": ["true"]}]
    created = emulator_server.create(doc)
    assert "Complete" in conditions(finished(emulator_server, "term"))
    (pod,) = pods_of(emulator_server, "term")
    meta = pod["metadata"]
    assert meta["labels"]["batch.kubernetes.io/job-name"] == "term"
    assert meta["labels"]["batch.kubernetes.io/controller-uid"] == created["metadata"]["uid"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Job",
        "term",
        created["metadata"]["uid"],
        True,
    )
    status = pod["status"]
    assert status["phase"] == "Succeeded"
    (init,) = status["initContainerStatuses"]
    assert init["name"] == "first" and init["state"]["terminated"]["exitCode"] == 0
    (main,) = status["containerStatuses"]
    assert main["state"]["terminated"]["reason"] == "Completed"
    # The operator's own reader finds the result.
    message = results.termination_message([pod], created["metadata"]["uid"])
    assert json.loads(message or "") == {"metrics": {"x": 1.5}}
    # Deleting the Job deletes its pod (garbage collection through the ownerReference).
    emulator_server.delete("jobs.batch", "term", NS)
    emulator_server.wait_for(lambda: not pods_of(emulator_server, "term"), 30)


def test_missing_secret_keeps_the_pod_pending(agent: NodeAgent, emulator_server: EmulatorServer) -> None:
    """CreateContainerConfigError with the kubelet's message; nothing runs; once the key exists it starts."""
    from finetune_operator.controller import podstate

    doc = job("nokey", "true", env=[{"name": "T", "valueFrom": {"secretKeyRef": {"name": "later", "key": "tok"}}}])
    doc["spec"]["template"]["spec"]["initContainers"] = [{"name": "check", "image": IMAGE, "command": ["true"]}]
    emulator_server.create(doc)

    def waiting() -> Any:
        pods = pods_of(emulator_server, "nokey")
        return podstate.stuck(pods) if pods else None

    found = emulator_server.wait_for(waiting, 60, "the pod never reported CreateContainerConfigError")
    assert (found.secret, found.key, found.container) == ("later", None, "main")
    assert found.message == 'secret "later" not found'
    (pod,) = pods_of(emulator_server, "nokey")
    assert pod["status"]["phase"] == "Pending"
    assert not [r for r in agent.records if r.pod.startswith("nokey") and r.container == "main"]
    emulator_server.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "later", "namespace": NS}, "data": {}}
    )
    found = emulator_server.wait_for(
        lambda: (f := waiting()) is not None and f.key == "tok" and f, 30, "no message about the key"
    )
    assert found.message == f"couldn't find key tok in Secret {NS}/later"
    emulator_server.patch("secrets", "later", {"data": {"tok": base64.b64encode(b"x").decode()}}, NS)
    assert "Complete" in conditions(finished(emulator_server, "nokey"))
    (pod,) = pods_of(emulator_server, "nokey")
    assert pod["status"]["phase"] == "Succeeded"
