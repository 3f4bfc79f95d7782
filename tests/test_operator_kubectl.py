"""End to end with the real tools: ``ftctl operator`` as its own process, the real ``kubectl``.

The user's path: apply the CRD, apply the SFT -> DPO -> merge -> serve example, watch ``kubectl get ftj``,
``kubectl wait --for=condition=Ready``. The test plays the workload controllers with ``kubectl patch
--subresource=status``, as a controller would.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from finetune_operator.controller.runtime import OperatorConfig, make_render, make_validate

from .emulator import EmulatorServer
from .emulator.chat_backend import serve_deployment
from .emulator.players import PLAYERS, RESOURCE, deployment_status, player
from .install_tools import OPERATOR_SA, OPERATOR_TOKEN, installed_chart
from .test_operator_harness import CRDS, EXAMPLE_IMAGE_PREFIXES, EXAMPLES, ftj_status

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = next(EXAMPLES.glob("04-*.yaml"))

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def success_patch(kind: str) -> dict[str, Any]:
    if kind in PLAYERS:
        return {"status": player(kind).succeeded()}
    return {"status": deployment_status({"metadata": {"generation": 1}, "spec": {"replicas": 1}})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def operator_process(
    emulator_server: EmulatorServer, kube_env: dict[str, str], tmp_path: pathlib.Path
) -> Iterator[subprocess.Popen[str]]:
    """``ftctl operator`` in its own process as the chart's ServiceAccount (RBAC enforced by the emulator),
    logging to a file (shown when a test fails); kubectl stays an admin."""
    emulator_server.enforce_rbac(installed_chart(), {OPERATOR_TOKEN: OPERATOR_SA})
    config = emulator_server.kubeconfig(tmp_path / "operator-kubeconfig", token=OPERATOR_TOKEN)
    # The example runs a worker image of the examples' registry: this install allows it.
    env = dict(
        kube_env,
        KUBECONFIG=str(config),
        FT_PROGRESS_INTERVAL_SECONDS="0.5",  # default (long) resync
        FT_ALLOWED_IMAGE_PREFIXES=",".join(EXAMPLE_IMAGE_PREFIXES),
    )
    log = (tmp_path / "operator.log").open("w")
    ftctl = [sys.executable, "-c", "from finetune_operator.cli import run; run()"]
    ports = {"liveness": free_port(), "metrics": free_port()}
    args = ["--liveness-port", str(ports["liveness"]), "--metrics-port", str(ports["metrics"])]
    proc = subprocess.Popen(
        [*ftctl, "operator", "--all-namespaces", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    proc.ports = ports  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
        log.close()
        if os.environ.get("FT_TEST_SHOW_OPERATOR_LOG"):
            print((tmp_path / "operator.log").read_text())


def test_kubectl_apply_and_wait_for_ready(
    emulator_server: EmulatorServer, kubectl: Kubectl, operator_process: subprocess.Popen[str], tmp_path: pathlib.Path
) -> None:
    kubectl("apply", "-f", str(CRDS))
    kubectl("wait", "--for=condition=established", "crd/finetunejobs.finetune.dev", timeout=30)
    doc = next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d)
    ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
    kubectl(
        "create", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    )
    kubectl("apply", "-f", str(EXAMPLE))

    config = OperatorConfig(allowed_image_prefixes=EXAMPLE_IMAGE_PREFIXES)
    plan = make_render(config)(make_validate(config)(doc))
    for step in plan.steps:
        kind, child = step.workload["kind"], step.workload["metadata"]["name"]
        emulator_server.wait_for_object(RESOURCE[kind], child, ns, timeout=30)
        table = kubectl("get", "ftj", name, "-n", ns).stdout
        header = table.splitlines()[0].split()
        assert header == ["NAME", "STAGE", "STATE", "PROGRESS", "LOSS", "METRIC", "AGE"]
        if step.kind == "train":
            # A worker's progress report shows up in the printer columns.
            report = {"status": {"reported": {step.name: {"step": 30, "totalSteps": 60, "loss": 1.25}}}}
            kubectl(
                "patch", "ftj", name, "-n", ns, "--subresource=status", "--type=merge", "-p", yaml.safe_dump(report)
            )
            emulator_server.wait_for(lambda: ftj_status(emulator_server, name, ns).get("progress") == "30/60 (50%)")
            row = kubectl("get", "ftj", name, "-n", ns, "--no-headers").stdout.split()
            assert step.name in row and "30/60" in row and "1.2500" in row
        if kind == "Deployment":  # its pods answer chat completions through the Service (the answer check)
            serve_deployment(emulator_server, child, ns)
        kubectl(
            "patch",
            RESOURCE[kind],
            child,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            yaml.safe_dump(success_patch(kind)),
        )

    start = time.monotonic()
    kubectl("wait", "--for=condition=Ready", f"ftj/{name}", "-n", ns, "--timeout=60s", timeout=90)
    assert time.monotonic() - start < 60
    row = kubectl("get", "ftj", name, "-n", ns, "--no-headers").stdout.split()
    assert row[0] == name and "Serving" in row
    endpoint = kubectl("get", "ftj", name, "-n", ns, "-o", "jsonpath={.status.outputs.endpoint}").stdout
    assert endpoint == f"http://{plan.step('serve').objects[-1]['metadata']['name']}.{ns}.svc:8000/v1"
    reasons = kubectl("get", "events", "-n", ns, "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert reasons.count("StageSucceeded") == len(plan.steps) - 1 and "Serving" in reasons
    assert operator_process.poll() is None  # still running

    # Liveness and metrics endpoints of the process.
    ports = operator_process.ports  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['liveness']}/healthz", timeout=10) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'finetune_children_created_total{kind="DeepSpeedJob"} 2.0' in text
    assert "finetune_stage_duration_seconds_bucket" in text
    assert 'finetune_api_requests_total{code="201",verb="POST"}' in text


def test_kopf_run_module_works_too(
    emulator_server: EmulatorServer, kube_env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    """``kopf run -m finetune_operator.controller.handlers`` is the same operator, configured from env vars."""
    emulator_server.apply_crd(CRDS)
    emulator_server.enforce_rbac(installed_chart(), {OPERATOR_TOKEN: OPERATOR_SA})
    config = emulator_server.kubeconfig(tmp_path / "operator-kubeconfig", token=OPERATOR_TOKEN)
    env = dict(kube_env, KUBECONFIG=str(config), FT_WORKER_IMAGE="registry.example.com/worker:test")
    log = (tmp_path / "kopf.log").open("w")
    cmd = [sys.executable, "-m", "kopf", "run", "-m", "finetune_operator.controller.handlers", "--standalone", "-A"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        doc = yaml.safe_load((EXAMPLES / "01-lora-sft-single-gpu.yaml").read_text())
        doc["metadata"]["namespace"] = "default"
        doc["spec"].pop("image", None)
        emulator_server.create(doc)
        name = doc["metadata"]["name"]
        job = emulator_server.wait_for_object("jobs.batch", f"{name}-download", timeout=30)
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/worker:test"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
