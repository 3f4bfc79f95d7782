"""A real vLLM (CPU build) serving the tiny model, shared by every test of a session that needs one.

``ftctl chat`` and the web console only need *a* served chat model; the model is the tiny Qwen2-shaped one the
tests build (its tokenizer carries a ChatML template), so no training runs first. Started once, on first use,
in its own process group, and stopped with it at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.local import serve as ls

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "tiny-chat"
START_TIMEOUT = 600.0


@dataclass(frozen=True)
class ServedModel:
    base_url: str
    """``http://127.0.0.1:PORT`` (no ``/v1``)."""
    port: int
    name: str


def vllm_python() -> Path | None:
    configured = os.environ.get("FT_VLLM_PYTHON")
    candidate = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


@pytest.fixture(scope="session")
def tiny_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    py = vllm_python()
    if py is None:
        pytest.skip("no vLLM environment: run scripts/install-vllm.sh (creates .venv-vllm) or set FT_VLLM_PYTHON")
    from finetune_operator.local.demo import ensure_tiny_model

    root = tmp_path_factory.mktemp("served-model")
    model = ensure_tiny_model(root / "tiny-model")
    port = ls.free_port()
    args = [str(model), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME]
    # CPU settings, as in manifests/examples/local-demo-serve.yaml: the tiny model's float32, eager mode (no
    # minute of torch.compile) and a 1 GiB KV cache instead of most of the machine's memory.
    args += ["--max-model-len", "512", "--dtype", "float32", "--enforce-eager"]
    cmd = ls.LocalServeCommand(
        argv=ls.with_launcher([str(py), "-m", ls.API_SERVER_MODULE], args),
        env={"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        host="127.0.0.1",
        port=port,
        served_models=[SERVED_NAME],
    )
    server = ls.VllmProcess(cmd, log_path=root / "vllm.log")
    server.start()
    try:
        server.wait_healthy(START_TIMEOUT)
        yield ServedModel(base_url=cmd.base_url, port=port, name=SERVED_NAME)
    finally:
        server.stop()
        if server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# A FineTuneJob that "serves" the tiny model in the emulated cluster: the object as the operator leaves it
# (spec, Ready status with outputs and a loss history) and its vLLM Service, whose endpoint the test plays.
# ------------------------------------------------------------------------------------------------

CRDS = REPO / "crds"


def job_manifest(name: str, namespace: str, served_name: str = SERVED_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"volume": {"claimName": "models", "subPath": "tiny"}, "template": "qwen"},
            "datasets": [{"name": "chat", "volume": {"claimName": "data", "subPath": "chat.jsonl"}}],
            "output": {"volume": {"claimName": "outputs"}},
            "stages": [{"name": "sft", "type": "sft", "datasets": ["chat"], "method": "lora"}],
            "merge": {"enabled": True},
            "serve": {"enabled": True, "servedModelName": served_name},
        },
    }


def loss_history(points: int) -> list[dict[str, Any]]:
    """A plausible decreasing loss curve, as ``status.stages[].history`` holds it."""
    return [
        {"step": 5 * (i + 1), "loss": round(2.5 * 0.97**i + 0.3, 4), "learningRate": 1e-4, "epoch": round(0.1 * i, 2)}
        for i in range(points)
    ]


def serving_status(
    name: str, namespace: str, history: list[dict[str, Any]], served_name: str = SERVED_NAME, ready: bool = True
) -> dict[str, Any]:
    from finetune_operator.api.naming import service_name

    svc = service_name(name, "serve")
    now = "2026-11-29T12:00:00Z"
    ready_cond = {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "Serving" if ready else "ServePending",
        "message": f"serving at http://{svc}.{namespace}.svc:8000/v1" if ready else "waiting for vLLM",
        "lastTransitionTime": now,
    }
    status: dict[str, Any] = {
        "state": "Serving" if ready else "Running",
        "currentStage": "serve",
        "progress": f"{history[-1]['step']}/{history[-1]['step']} (100%)" if history else None,
        "loss": f"{history[-1]['loss']:.4f}" if history else None,
        "conditions": [ready_cond],
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "state": "Succeeded",
                "attempts": 1,
                "startTime": now,
                "completionTime": now,
                "history": history,
            },
            {"name": "merge", "type": "merge", "state": "Succeeded", "attempts": 1},
            {"name": "serve", "type": "serve", "state": "Succeeded" if ready else "Running", "attempts": 1},
        ],
        "outputs": {"mergedModel": "/outputs/merged", "servedModelName": served_name},
    }
    if ready:
        status["outputs"]["endpoint"] = f"http://{svc}.{namespace}.svc:8000/v1"
    return {k: v for k, v in status.items() if v is not None}


def seed_serving_job(
    server: Any, name: str, namespace: str, *, backend: str | None, history_points: int = 40, ready: bool = True
) -> dict[str, Any]:
    """Create the CRD (once), the namespace, the job with its status and its vLLM Service in the emulator;
    ``backend`` is where the Service's port answers (None: a Service without ready endpoints)."""
    from finetune_operator.api.naming import service_name

    if server.get("customresourcedefinitions", "finetunejobs.finetune.dev", None) is None:
        server.apply_crd(CRDS)
    server.ensure_namespace(namespace)
    server.create(job_manifest(name, namespace), namespace)
    history = loss_history(history_points)
    server.patch_status("finetunejobs", name, serving_status(name, namespace, history, ready=ready), namespace)
    svc = service_name(name, "serve")
    server.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": svc, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
        },
        namespace,
    )
    if backend is not None:
        server.emulator.service_backends[(namespace, svc, "8000")] = backend
    return {"history": history, "service": svc}
