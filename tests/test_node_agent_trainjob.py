"""The node agent's Kubeflow Trainer v2 player (tests/node_agent/trainjob.py).

What the trainjob e2e test relies on, checked where a failure is cheap to read: the JobSet the runtime and the
TrainJob make together (runtime patches merged as a strategic merge patch, trainer overrides, the torch
plugin's ``PET_*`` environment), then small pods in the Python base image (seconds each): two nodes that find
each other by their JobSet DNS names, ``Suspended``/``Resumed``, ``Complete`` and ``Failed`` as Trainer writes
them, a failed node counted against the Job's ``backoffLimit``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.emulator import EmulatorServer
from tests.install_tools import ROOT
from tests.node_agent import NodeAgent
from tests.node_agent.trainjob import TORCH_DISTRIBUTED, install_runtimes, strategic_merge, trainer_job
from tests.test_node_agent import IMAGE, NS, agent, base_image  # noqa: F401 (fixtures)

TJ = "trainjobs.trainer.kubeflow.org"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def golden_trainjob() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "tests/golden/07-lora-sft-merge-trainjob-kueue.yaml").read_text())
    return next(d for d in docs if d["kind"] == "TrainJob")


def test_runtime_patches_and_trainer_overrides_make_the_node_pod() -> None:
    """The rendered TrainJob of example 07 on the vendored torch-distributed runtime."""
    tj = golden_trainjob()
    runtime = yaml.safe_load(TORCH_DISTRIBUTED.read_text())
    job = trainer_job(tj, runtime, master_port=29500)
    name = tj["metadata"]["name"]
    assert (job.name, job.subdomain, job.nodes, job.backoff_limit) == (f"{name}-node-0", name, 2, 6)
    pod = job.template["spec"]
    patch_pod = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patch_pod = patch_pod["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    trainer = tj["spec"]["trainer"]
    # Trainer overrides replace the runtime's image and command; resourcesPerNode become the container's.
    runtime_pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert container["image"] == trainer["image"] != runtime_pod["containers"][0]["image"]
    assert container["command"] == trainer["command"] and container["resources"] == trainer["resourcesPerNode"]
    # The patch's volumes, mounts, contexts and scheduling fields land on the pod.
    assert (
        pod["volumes"] == patch_pod["volumes"]
        and container["volumeMounts"] == patch_pod["containers"][0]["volumeMounts"]
    )
    assert container["securityContext"] == patch_pod["containers"][0]["securityContext"]
    for key in ("securityContext", "serviceAccountName", "nodeSelector", "tolerations"):
        assert pod[key] == patch_pod[key], key
    labels = job.template["metadata"]["labels"]
    assert labels["finetune.dev/stage"] == "sft" and labels["jobset.sigs.k8s.io/jobset-name"] == name
    assert pod["restartPolicy"] == "OnFailure"  # JobSet's default; runtime patches cannot set it
    # The trainer env first, then the torch plugin's.
    env = container["env"]
    assert [e["name"] for e in env[: len(trainer["env"])]] == [e["name"] for e in trainer["env"]]
    torch = {e["name"]: e.get("value", e.get("valueFrom")) for e in env[len(trainer["env"]) :]}
    assert torch == {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": {
            "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
        },
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
        "PET_MASTER_PORT": "29500",
    }
    assert container["ports"] == [{"containerPort": 29500}]


def test_strategic_merge_keys() -> None:
    base = {
        "containers": [
            {"name": "node", "env": [{"name": "A", "value": "1"}], "volumeMounts": [{"name": "x", "mountPath": "/x"}]}
        ],
        "tolerations": [{"key": "a"}],
        "nodeSelector": {"a": "1"},
    }
    patch = {
        "containers": [
            {"name": "node", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]},
            {"name": "side"},
        ],
        "tolerations": [{"key": "b"}],
        "nodeSelector": {"b": "2"},
    }
    got = strategic_merge(base, patch)
    assert got["containers"] == [
        {
            "name": "node",
            "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}],
            "volumeMounts": [{"name": "x", "mountPath": "/x"}],
        },
        {"name": "side"},
    ]
    assert got["tolerations"] == [{"key": "b"}]  # no patch strategy: replaced
    assert got["nodeSelector"] == {"a": "1", "b": "2"}
    assert strategic_merge({"a": 1, "b": 2}, {"a": None}) == {"b": 2}


# ---------------------------------------------------------------------------------------------------------- pods


def trainjob(name: str, script: str, *, runtime: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A two-node TrainJob of the small image with our kind of runtime patch (PVC, token volume, users)."""
    pod_patch = {
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
        "serviceAccountName": "worker",
        "containers": [
            {
                "name": "node",
                "volumeMounts": [
                    {"name": "out", "mountPath": "/mnt/out"},
                    {"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True},
                ],
            }
        ],
        "volumes": [
            {"name": "out", "persistentVolumeClaim": {"claimName": "out"}},
            {
                "name": "kube-api-access",
                "projected": {
                    "defaultMode": 0o444,
                    "sources": [
                        {"serviceAccountToken": {"path": "token"}},
                        {
                            "downwardAPI": {
                                "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                            }
                        },
                    ],
                },
            },
        ],
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                **(runtime or {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}),
            },
            "trainer": {"image": IMAGE, "command": ["sh", "-c", script], "numNodes": 2, "numProcPerNode": 1},
            "runtimePatches": [
                {
                    "manager": "test",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": "node", "template": {"spec": {"template": {"spec": pod_patch}}}}
                                ]
                            }
                        }
                    },
                }
            ],
            **spec,
        },
    }


def conditions(server: EmulatorServer, name: str) -> dict[str, tuple[str, str]]:
    obj = server.get(TJ, name, NS) or {}
    return {c["type"]: (c["status"], c["reason"]) for c in (obj.get("status") or {}).get("conditions") or []}


def finished(server: EmulatorServer, name: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> Any:
        conds = conditions(server, name)
        if any(conds.get(t, ("", ""))[0] == "True" for t in ("Complete", "Failed")):
            return (server.get(TJ, name, NS) or {})["status"]
        return None

    return dict(server.wait_for(done, timeout, f"TrainJob {name} never finished"))


@pytest.mark.e2e
def test_two_nodes_find_each_other_after_resume(agent: NodeAgent, emulator_server: EmulatorServer) -> None:  # noqa: F811
    install_runtimes(emulator_server)
    out = agent.kubelet.claim_dir(NS, "out")
    script = (
        "set -e; f=/mnt/out/$PET_NODE_RANK; "
        'printf "%s\\n" "$(id -u):$(id -g)" "$PET_NNODES" "$PET_NPROC_PER_NODE" "$JOB_COMPLETION_INDEX" '
        '"$PET_MASTER_ADDR" "$PET_MASTER_PORT" "$HOSTNAME" "$(cat ' + SA_DIR + '/namespace)" > $f; '
        "test -s " + SA_DIR + "/token; getent hosts $PET_MASTER_ADDR >> $f; "
        f"getent hosts tj-node-0-1.tj.{NS}.svc >> $f"
    )
    emulator_server.create(trainjob("tj", script, suspend=True))
    emulator_server.wait_for(lambda: conditions(emulator_server, "tj").get("Suspended") == ("True", "Suspended"), 30)
    assert not [r for r in agent.records if r.pod.startswith("tj-")]
    emulator_server.patch(TJ, "tj", {"spec": {"suspend": False}}, NS)
    status = finished(emulator_server, "tj")
    assert conditions(emulator_server, "tj") == {
        "Suspended": ("False", "Resumed"),
        "Complete": ("True", "AllJobsCompleted"),
    }
    assert status["jobsStatus"] == [
        {"name": "node", "ready": 0, "succeeded": 1, "failed": 0, "active": 0, "suspended": 0}
    ]
    ports = set()
    for rank in (0, 1):
        lines = (out / str(rank)).read_text().splitlines()
        user, nnodes, nproc, index, master, port, hostname, namespace = lines[:8]
        assert (user, nnodes, nproc, index, master) == ("65532:65532", "2", "1", str(rank), "tj-node-0-0.tj")
        assert (hostname, namespace) == (f"tj-node-0-{rank}", NS)
        assert all(line.startswith("127.0.0.1") for line in lines[8:]) and len(lines) == 10, lines
        ports.add(port)
    assert len(ports) == 1
    assert sorted(r.pod.rsplit("-", 1)[0] for r in agent.records) == ["tj-node-0-0", "tj-node-0-1"]
    # Their Pod objects: the JobSet's and the Job controller's labels, deleted with the TrainJob.
    pods = emulator_server.list("pods", NS)
    assert sorted(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    for pod in pods:
        assert pod["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == "tj"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "TrainJob" and pod["status"]["phase"] == "Succeeded"
    emulator_server.delete(TJ, "tj", NS)
    emulator_server.wait_for(lambda: not emulator_server.list("pods", NS), 30, "the pods outlived their TrainJob")


@pytest.mark.e2e
def test_a_failed_node_counts_against_backoff_limit(agent: NodeAgent, emulator_server: EmulatorServer) -> None:  # noqa: F811
    # A namespaced TrainingRuntime whose Job allows one retry (the torch-distributed one has Kubernetes' 6).
    runtime = copy.deepcopy(yaml.safe_load(TORCH_DISTRIBUTED.read_text()))
    runtime["kind"] = "TrainingRuntime"
    runtime["metadata"] = {"name": "torch-once", "namespace": NS}
    runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["backoffLimit"] = 1
    path = Path(agent.root) / "runtime.yaml"
    path.write_text(yaml.safe_dump(runtime))
    install_runtimes(emulator_server, path)
    # Rank 1 fails; rank 0 would wait for it forever.
    script = 'if [ "$PET_NODE_RANK" = 1 ]; then exit 7; fi; exec sleep 600'
    emulator_server.create(trainjob("broken", script, runtime={"kind": "TrainingRuntime", "name": "torch-once"}))
    emulator_server.create(trainjob("elsewhere", "true", runtime={"kind": "Unknown", "name": "x"}))
    status = finished(emulator_server, "broken")
    assert conditions(emulator_server, "broken") == {"Failed": ("True", "FailedJobs")}
    assert status["jobsStatus"][0]["failed"] == 1
    codes = sorted((r.pod.rsplit("-", 1)[0], r.exit_code) for r in agent.records if r.pod.startswith("broken"))
    # Two tries; rank 0 stopped each time (not counted: only the failed pod is, as backoffLimit 1 shows).
    assert [(pod, code != 0) for pod, code in codes] == [("broken-node-0-0", True)] * 2 + [
        ("broken-node-0-1", True)
    ] * 2
    assert [code for _, code in codes[2:]] == [7, 7]
    finished(emulator_server, "elsewhere")
    assert conditions(emulator_server, "elsewhere") == {"Failed": ("True", "TrainingRuntimeNotSupported")}
