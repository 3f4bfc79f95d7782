"""Offline security scanners over what we ship and what we generate.

- checkov (its own venv, ``--skip-download --framework kubernetes``) over the chart rendered with several
  value sets and over the manifests ``ftctl render`` produces for every example FineTuneJob: no failed check
  except those listed, each with its reason, in ``security/checkov-skips.yaml``; a listed skip that no longer
  matches a failure fails too, so the list only shrinks.
- Custom workloads (PyTorchJob, DeepSpeedJob) are invisible to checkov; their pod templates are scanned as
  Pods so that the training pods get the same scrutiny as batch/v1 Jobs.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.install_tools import (
    EXAMPLES,
    ROOT,
    find_checkov,
    find_helm,
    helm_template_text,
    load_all,
    run,
    venv_tool,
)

SKIPS_FILE = ROOT / "security" / "checkov-skips.yaml"
CHART_VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "netpol-monitoring": {"networkPolicy": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
    "console": {"console": {"enabled": True}, "networkPolicy": {"enabled": True}},
}
EXAMPLE_FILES = sorted(EXAMPLES.glob("0*.yaml"))
NATIVE_KINDS = {"Pod", "Job", "Deployment", "StatefulSet", "DaemonSet", "CronJob", "ReplicaSet"}


def pod_templates(obj: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every pod template nested in a custom resource (e.g. ``spec.pytorchReplicaSpecs.Worker.template``)."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(obj, dict):
        template = obj.get("template")
        if isinstance(template, dict) and isinstance(template.get("spec"), dict) and "containers" in template["spec"]:
            found.append((path, template))
        for key, value in obj.items():
            if key != "template":
                found += pod_templates(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += pod_templates(value, f"{path}[{i}]")
    return found


def with_custom_workloads_as_pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add one Pod per pod template of each custom workload kind."""
    out = list(objects)
    for obj in objects:
        if obj.get("kind") in NATIVE_KINDS:
            continue
        for path, template in pod_templates(obj.get("spec", {})):
            # e.g. qwen2-support-sft-pytorchjob-master: the kind in the name lets skips target custom workloads.
            replica = path.split(".")[-1].lower()
            metadata = dict(template.get("metadata") or {})
            metadata["name"] = f"{obj['metadata']['name']}-{obj['kind'].lower()}-{replica}"
            metadata["namespace"] = obj["metadata"].get("namespace", "default")
            annotations = dict(metadata.get("annotations") or {})
            annotations["finetune.dev/scanned-from"] = f"{obj['kind']}/{obj['metadata']['name']}"
            metadata["annotations"] = annotations
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    return out


def checkov_failures(checkov: Path, directory: Path) -> dict[str, list[tuple[str, str, str]]]:
    """Failed checks by top-level subdirectory of ``directory``: (check id, resource id, file name).

    One checkov run for everything: its start-up (~10 s) dominates. Resource ids of Pods are cut before their
    labels, which checkov appends.
    """
    proc = run(
        [checkov, "--skip-download", "--framework", "kubernetes", "--quiet", "--output", "json", "-d", directory],
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    reports = json.loads(proc.stdout) if proc.stdout.strip() else []
    if isinstance(reports, dict):
        reports = [reports]
    failures: dict[str, list[tuple[str, str, str]]] = {p.name: [] for p in directory.iterdir()}
    scanned = 0
    for report in reports:
        if not isinstance(report, dict) or "results" not in report:
            continue
        scanned += report["summary"]["passed"] + report["summary"]["failed"]
        for failed in report["results"]["failed_checks"]:
            resource = failed["resource"].split(".app.kubernetes.io/")[0]
            group, *_, name = Path(failed["file_path"].lstrip("/")).parts
            failures[group].append((failed["check_id"], resource, name))
    assert scanned > 0, f"checkov scanned nothing in {directory}: {proc.stdout[-2000:]}"
    return failures


def load_skips() -> dict[str, list[dict[str, Any]]]:
    data = yaml.safe_load(SKIPS_FILE.read_text())
    for scope, entries in data.items():
        for entry in entries:
            assert set(entry) == {"check", "resources", "reason"}, f"{scope}: {entry}"
            assert len(entry["reason"].split()) >= 8, f"{scope} {entry['check']}: give a real reason"
    return data


def unexplained(failures: list[tuple[str, str, str]], skips: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Failures no skip explains, and skips that explain no failure."""
    used: set[int] = set()
    left = []
    for check, resource, file in failures:
        matches = [
            i
            for i, s in enumerate(skips)
            if s["check"] == check and any(fnmatch.fnmatchcase(resource, pattern) for pattern in s["resources"])
        ]
        if matches:
            used.update(matches)
        else:
            left.append(f"{check} {resource} ({file})")
    stale = [f"{s['check']} {s['resources']}" for i, s in enumerate(skips) if i not in used]
    return sorted(set(left)), stale


INSECURE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "insecure", "namespace": "ml"},
    "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
}


def _render_chart(directory: Path, tmp: Path) -> None:
    helm = find_helm()
    for name, values in CHART_VALUES.items():
        (directory / f"{name}.yaml").write_text(helm_template_text(helm, values, tmp_path=tmp))


def _render_examples(directory: Path) -> None:
    assert EXAMPLE_FILES, "no example FineTuneJobs in manifests/examples"
    ftctl = venv_tool("ftctl")
    procs = {
        example: subprocess.Popen(
            [ftctl, "render", "-f", example], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for example in EXAMPLE_FILES
    }
    for example, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"ftctl render -f {example.name}: {err}"
        objects = load_all(out)
        assert objects, f"ftctl render produced nothing for {example.name}"
        (directory / example.name).write_text(yaml.safe_dump_all(with_custom_workloads_as_pods(objects)))


@pytest.fixture(scope="module")
def scan_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    for group in ("chart", "examples", "canary"):
        (root / group).mkdir()
    _render_chart(root / "chart", tmp_path_factory.mktemp("values"))
    _render_examples(root / "examples")
    (root / "canary" / "insecure.yaml").write_text(yaml.safe_dump(INSECURE_POD))
    return root


@pytest.fixture(scope="module")
def failures(scan_root: Path) -> dict[str, list[tuple[str, str, str]]]:
    return checkov_failures(find_checkov(), scan_root)


def test_skips_file_is_well_formed() -> None:
    skips = load_skips()
    assert set(skips) == {"chart", "examples"}


@pytest.mark.parametrize("group", ["chart", "examples"])
def test_checkov_finds_nothing_unexplained(failures: dict[str, list[tuple[str, str, str]]], group: str) -> None:
    left, stale = unexplained(failures[group], load_skips()[group])
    assert not left, "failed checkov checks (fix them, or justify in security/checkov-skips.yaml):\n" + "\n".join(left)
    assert not stale, "skips that match no failure any more (delete them):\n" + "\n".join(stale)


def test_checkov_catches_an_insecure_pod(failures: dict[str, list[tuple[str, str, str]]]) -> None:
    """Guards the scans above against a checkov that checks nothing (e.g. a broken install)."""
    checks = {check for check, _, _ in failures["canary"]}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_14"} <= checks  # privileged, privilege escalation, :latest


def test_custom_workloads_are_scanned_as_pods(scan_root: Path) -> None:
    """The PyTorchJob/DeepSpeedJob examples contribute Pods to the scan (else their pods go unchecked)."""
    files = (scan_root / "examples").iterdir()
    kinds_by_file = {p.name: [o["kind"] for o in load_all(p.read_text())] for p in files}
    custom = {name for name, kinds in kinds_by_file.items() if {"PyTorchJob", "DeepSpeedJob"} & set(kinds)}
    assert custom, "the examples exercise at least one custom workload kind"
    for name in custom:
        assert "Pod" in kinds_by_file[name], name


def test_unexplained_reports_both_directions() -> None:
    skips = [
        {"check": "CKV_A", "resources": ["Job.*.x-*"], "reason": "r"},
        {"check": "CKV_B", "resources": ["*"], "reason": "r"},
    ]
    left, stale = unexplained([("CKV_A", "Job.ml.x-sft", "f"), ("CKV_A", "Job.ml.y-sft", "f")], skips)
    assert left == ["CKV_A Job.ml.y-sft (f)"]
    assert stale == ["CKV_B ['*']"]
