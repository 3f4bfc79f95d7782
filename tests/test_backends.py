"""The backend registry is the one list of training backends, and the TrainJob backend's specifics.

Everything that enumerates backends derives from ``finetune_operator.backends.REGISTRY``; these tests fail when
one of those places is not derived (or a new backend misses a piece: a player, a vendored schema, RBAC).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from finetune_operator import backends
from finetune_operator.api.types import Backend
from finetune_operator.backends import trainjob
from finetune_operator.controller import children as ch
from finetune_operator.controller import rbac
from finetune_operator.crd import build_crd
from finetune_operator.render import RenderOptions, render
from finetune_operator.render.workloads import suspend_path
from finetune_operator.validation import check, validate
from finetune_operator.worker import envmap
from tests.emulator.players import PLAYERS
from tests.emulator.runner import EXTRA_RESOURCES

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "fixtures" / "crds"
EXAMPLE = ROOT / "manifests" / "examples" / "07-lora-sft-merge-trainjob-kueue.yaml"
BACKENDS = list(backends.REGISTRY.values())


def _doc() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _trainjob(doc: dict[str, Any] | None = None) -> dict[str, Any]:
    return render(validate(doc or _doc())).step("sft").workload


# ------------------------------------------------------------------------------------------------ registry


def test_api_literal_and_crd_enum_are_the_registry() -> None:
    assert list(get_args(Backend)) == list(backends.REGISTRY)
    enum = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert enum["backend"]["enum"] == list(backends.REGISTRY)


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
def test_everything_that_enumerates_backends_derives_from_the_registry(backend: backends.Backend) -> None:
    group, _, version = backend.api_version.rpartition("/")
    assert ch.PLURALS[(backend.api_version, backend.kind)] == backend.plural
    assert (group, version, backend.plural) in ch.WATCHED
    assert suspend_path(backend.kind) == backend.suspend_path
    for verb in ("get", "list", "watch", "create", "patch", "delete"):
        assert rbac.allows(group, backend.plural, verb), verb
    assert backend.name in envmap.BACKENDS
    assert backend.kind in PLAYERS
    if backend.api_version != "batch/v1":
        assert any(r["kind"] == backend.kind for r in EXTRA_RESOURCES)


def test_unknown_kind_is_no_backend() -> None:
    assert backends.by_kind("Deployment") is None
    with pytest.raises(KeyError, match="unknown backend 'mpijob'"):
        backends.get("mpijob")


# ------------------------------------------------------------------------------------------------ trainjob


def test_trainjob_overrides_the_vendored_runtime() -> None:
    """The runtime patch names the replicated job and container the torch-distributed runtime really has."""
    runtime = yaml.safe_load((CRDS / "trainer.kubeflow.org_torch-distributed-runtime.yaml").read_text())
    rjob = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert runtime["metadata"]["name"] == trainjob.DEFAULT_RUNTIME
    wl = _trainjob()
    spec = wl["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": runtime["metadata"]["name"],
    }
    (patch,) = spec["runtimePatches"]
    (pjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert pjob["name"] == rjob["name"]
    pod = pjob["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == [
        c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]
    ]
    # Every mount has its volume; claims read-only except the output.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    assert mounts["/mnt/volumes/models"]["readOnly"] and not mounts["/mnt/volumes/shared-outputs"]["readOnly"]
    assert mounts[trainjob.SA_DIR]["readOnly"]
    assert pod["serviceAccountName"] == f"{_doc()['metadata']['name']}-worker"  # its own identity
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_trainjob_trainer_fields_kueue_and_suspend() -> None:
    wl = _trainjob()
    trainer = wl["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert trainer["command"][:3] == ["ftctl", "worker", "train"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["FT_BACKEND"] == "trainjob"
    # Trainer v2's torch plugin refuses TrainJobs whose trainer env sets torchrun's reserved variables.
    assert not [k for k in env if k.startswith("PET_")]
    assert wl["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-ml"
    assert wl["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    doc = _doc()
    del doc["spec"]["scheduling"]["queueName"]
    assert _trainjob(doc)["spec"]["suspend"] is False


def test_trainjob_default_runtime_and_namespaced_runtime() -> None:
    doc = _doc()
    del doc["spec"]["trainingRuntime"]
    assert _trainjob(doc)["spec"]["runtimeRef"]["name"] == "torch-distributed"
    doc["spec"]["trainingRuntime"] = {"kind": "TrainingRuntime", "name": "llm-torch"}
    ref = _trainjob(doc)["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("TrainingRuntime", "llm-torch")


def _cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def _jobs(**counts: int) -> dict[str, Any]:
    """One ``status.jobsStatus`` entry (Trainer v2: counts of the replicated job's Jobs)."""
    return {"name": "node", **{k: counts.get(k, 0) for k in ("ready", "succeeded", "failed", "active", "suspended")}}


@pytest.mark.parametrize(
    ("obj", "phase", "reason", "suspended"),
    [
        ({"spec": {}}, ch.Phase.PENDING, "", False),
        # The vendored release (kubeflow/trainer 8c0f5059) writes no Created condition: the child Jobs say it.
        ({"spec": {}, "status": {"jobsStatus": [_jobs()]}}, ch.Phase.PENDING, "", False),
        ({"spec": {}, "status": {"jobsStatus": [_jobs(active=1, ready=1)]}}, ch.Phase.RUNNING, "", False),
        ({"spec": {"suspend": True}, "status": {"jobsStatus": [_jobs(active=1)]}}, ch.Phase.SUSPENDED, "", True),
        # Releases before kubeflow/trainer#2621 wrote Created.
        (
            {"spec": {}, "status": {"conditions": [_cond("Created", reason="JobsCreationSucceeded")]}},
            ch.Phase.RUNNING,
            "JobsCreationSucceeded",
            False,
        ),
        ({"spec": {"suspend": True}}, ch.Phase.SUSPENDED, "", True),
        (
            {"spec": {}, "status": {"conditions": [_cond("Suspended", reason="Suspended")]}},
            ch.Phase.SUSPENDED,
            "Suspended",
            False,
        ),
        (
            {
                "spec": {},
                "status": {"conditions": [_cond("Suspended", "False", "Resumed")], "jobsStatus": [_jobs(active=1)]},
            },
            ch.Phase.RUNNING,
            "",
            False,
        ),
        (
            {
                "spec": {},
                "status": {
                    "conditions": [_cond("Complete", reason="AllJobsCompleted")],
                    "jobsStatus": [_jobs(succeeded=1)],
                },
            },
            ch.Phase.SUCCEEDED,
            "AllJobsCompleted",
            False,
        ),
        (
            {
                "spec": {},
                "status": {
                    "conditions": [_cond("Failed", reason="FailedJobs", message="jobset failed")],
                    "jobsStatus": [_jobs(failed=1)],
                },
            },
            ch.Phase.FAILED,
            "FailedJobs",
            False,
        ),
    ],
    ids=[
        "new",
        "jobs-not-started",
        "jobs-active",
        "suspended-with-active-jobs",
        "created-older-release",
        "suspend-flag",
        "suspended-cond",
        "resumed",
        "complete",
        "failed",
    ],
)
def test_trainjob_status(obj: dict[str, Any], phase: str, reason: str, suspended: bool) -> None:
    got = ch.interpret({"kind": "TrainJob", **obj})
    assert (got.phase, got.reason, got.suspended) == (phase, reason, suspended)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"metadata": {"name": "7-llama"}}, "metadata.name"),
        ({"spec": {"scheduling": {"priorityClassName": "high"}}}, "spec.scheduling.priorityClassName"),
        ({"spec": {"scheduling": {"schedulerName": "volcano"}}}, "spec.scheduling.schedulerName"),
        ({"spec": {"backend": "job"}}, "spec.trainingRuntime"),
    ],
)
def test_trainjob_validation(change: dict[str, Any], path: str) -> None:
    doc = _doc()
    for key, value in change.items():
        for k, v in value.items():
            if isinstance(v, dict):
                doc[key].setdefault(k, {}).update(v)
            else:
                doc[key][k] = v
    _, errors = check(doc)
    assert path in [e.path for e in errors], errors


def test_trainjob_renders_with_a_local_resolver_too() -> None:
    from finetune_operator.render.plan import PathResolver

    wl = (
        render(validate(copy.deepcopy(_doc())), RenderOptions(resolver=PathResolver(config_dir="/cfg")))
        .step("sft")
        .workload
    )
    assert wl["spec"]["trainer"]["command"][-1] == "/cfg/sft.yaml"


def test_trainjob_stage_priority_class_is_refused_and_affinity_is_patched() -> None:
    doc = _doc()
    doc["spec"]["stages"][0]["scheduling"] = {"priorityClassName": "high"}
    _, errors = check(doc)
    assert "spec.stages[0].scheduling.priorityClassName" in [e.path for e in errors]
    doc = _doc()
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    doc["spec"]["scheduling"]["affinity"] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    }
    pod = _trainjob(doc)["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"
    ]["spec"]["template"]["spec"]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        term
    ]
