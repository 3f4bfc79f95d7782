"""The emulated cluster of the end-to-end tests (tests/test_e2e.py) and of bench/e2e_vs_local.py.

The API-server emulator with the CRDs and Kubeflow Trainer v2's torch-distributed runtime, a namespace holding
the hub token Secret, the operator started as the chart's Deployment starts it (default images pointed at the
locally built ones), the node agent running every pod in its image, and a stand-in hub serving the shared tiny
model only to holders of the token.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.local.tinymodel import build_demo_data
from tests.emulator import EmulatorServer
from tests.install_tools import ROOT, find_helm, render_chart
from tests.node_agent import NodeAgent
from tests.node_agent.hub import Hub
from tests.node_agent.trainjob import install_runtimes
from tests.operator_session import FTJ, operator_command

TAG = "dev"
WORKER_IMAGE = f"localhost/finetune-worker:{TAG}"
VLLM_IMAGE = f"localhost/finetune-vllm:{TAG}"
REPO = "org/tiny-qwen2"
NS = "e2e"
TOKEN_SECRET = {"name": "hf-token", "key": "token"}


def build_images(*targets: str) -> subprocess.CompletedProcess[str]:
    """scripts/build-images.sh (a no-op when nothing changed)."""
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    server: EmulatorServer
    agent: NodeAgent
    hub: Hub
    root: Path
    kube_env: dict[str, str]
    operator_log: Path

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        kubectl = str(Path(sys.executable).parent / "kubectl")
        proc = subprocess.run(
            [kubectl, *args], env=self.kube_env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}{proc.stdout}"
        return proc

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.server.get(FTJ, name, NS) or {}).get("status") or {})

    def claim(self, claim: str) -> Path:
        """The host folder of a PVC claim in the test namespace."""
        return self.agent.kubelet.claim_dir(NS, claim)


@contextmanager
def cluster(root: Path, model: Path, token: str) -> Iterator[Cluster]:
    """Everything up and running; torn down (containers killed) on exit."""
    hub = Hub(REPO, model, token).start()
    server = EmulatorServer().start()
    proc: subprocess.Popen[bytes] | None = None
    agent: NodeAgent | None = None
    log_path = root / "operator.log"
    try:
        server.apply_crd(ROOT / "crds")
        # Kubeflow Trainer v2 as a cluster admin installs it: its runtime kinds and the torch-distributed runtime.
        install_runtimes(server)
        server.ensure_namespace(NS)
        # What kube-controller-manager's root-CA publisher puts into every namespace (projected ServiceAccount
        # token volumes read it). The emulator speaks plain HTTP: there is no CA to publish.
        server.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "kube-root-ca.crt", "namespace": NS},
                "data": {"ca.crt": ""},
            }
        )
        # The Secret as `kubectl create secret generic` stores it (base64 data).
        server.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": TOKEN_SECRET["name"], "namespace": NS},
                "type": "Opaque",
                "data": {TOKEN_SECRET["key"]: base64.b64encode(token.encode()).decode()},
            }
        )
        chart = render_chart(find_helm(), {}, tmp_path=root)
        cmd, chart_env = operator_command(chart, _free_port(), _free_port())
        kube_env = server.env(server.kubeconfig(root / "kubeconfig", namespace=NS))
        env = {
            **kube_env,
            **chart_env,
            "FT_WORKER_IMAGE": WORKER_IMAGE,
            "FT_VLLM_IMAGE": VLLM_IMAGE,
            "PYTHONUNBUFFERED": "1",
        }
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        # Node-level environment (tests/node_agent/README.md): the hub's address (huggingface.co cannot be
        # pointed at the stand-in: TLS) and the API server's plain-HTTP address for the workers' progress
        # reports, sent without delay.
        node_env = {"HF_ENDPOINT": hub.url, "FT_KUBE_API": server.url, "FT_PROGRESS_INTERVAL": "0"}
        agent = NodeAgent(server, root / "node", node_env=node_env).start()
        build_demo_data(agent.kubelet.claim_dir(NS, "demo-data"))
        yield Cluster(server, agent, hub, root, kube_env, log_path)
    finally:
        if agent is not None:
            agent.stop()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
        hub.stop()
