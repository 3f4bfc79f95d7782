"""A stand-in for the vLLM pods behind a Service, for the operator tests that play Deployments.

The operator's answer check (finetune_operator/controller/answering.py) POSTs one chat completion through the
API server's Service proxy before ``Ready`` turns true. The tests play the Deployment controller (no pod runs),
so they also play what its pods would answer: :func:`serve_deployment` registers, for every Service whose
selector matches the Deployment's pod labels, a backend in the emulator's Service proxy
(``emulator.service_backends``) that answers like vLLM's OpenAI server for the model names the Deployment's
container arguments serve (``--served-model-name`` and the ``--lora-modules`` names), and 404s other names with
vLLM's error shape.

One HTTP server on 127.0.0.1 per test process serves every registration under its own random path prefix, so
tests and emulators never share a behaviour. A test may make a backend misbehave (:meth:`ChatStandIn.set`:
answer with an HTTP status, or claim another model) and sees every completion request it received.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RESOURCE_DEPLOYMENTS = "deployments.apps"


@dataclass
class Behaviour:
    """What one registered backend answers."""

    #: Model names served (as vLLM's ``--served-model-name`` and LoRA module names).
    models: tuple[str, ...]
    #: Answer every completion with this HTTP status and a vLLM-shaped error instead (None: answer normally).
    status: int | None = None
    #: Claim this model in a 200 answer instead of the one asked for (a Service routed to another server).
    claim_model: str | None = None
    #: Answer only requests carrying ``Authorization: Bearer <api_key>`` (vLLM's ``--api-key``), else 401.
    api_key: str | None = None
    #: The ``Authorization`` headers of the completion requests received.
    authorizations: list[str | None] = field(default_factory=list)
    #: Completion requests received (their JSON bodies).
    requests: list[dict[str, Any]] = field(default_factory=list)


class ChatStandIn:
    """The process-wide stand-in server (started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.behaviours: dict[str, Behaviour] = {}

    def _ensure(self) -> ThreadingHTTPServer:
        with self._lock:
            if self._server is None:
                standin = self

                class Handler(BaseHTTPRequestHandler):
                    def log_message(self, *args: Any) -> None:  # quiet
                        pass

                    def _send(self, status: int, doc: Any) -> None:
                        data = json.dumps(doc).encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)

                    def do_GET(self) -> None:
                        prefix, _, rest = self.path.lstrip("/").partition("/")
                        b = standin.behaviours.get(prefix)
                        if b is None:
                            self._send(404, {"detail": "Not Found"})
                        elif rest == "health":
                            self._send(200, {})
                        elif rest == "v1/models":
                            self._send(
                                200, {"object": "list", "data": [{"id": m, "object": "model"} for m in b.models]}
                            )
                        else:
                            self._send(404, {"detail": "Not Found"})

                    def do_POST(self) -> None:
                        prefix, _, rest = self.path.lstrip("/").partition("/")
                        b = standin.behaviours.get(prefix)
                        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                        if b is None or rest != "v1/chat/completions":
                            self._send(404, {"detail": "Not Found"})
                            return
                        try:
                            req = json.loads(body)
                        except ValueError:
                            self._send(400, _error("invalid JSON", "BadRequestError", 400))
                            return
                        b.requests.append(req)
                        auth = self.headers.get("Authorization")
                        b.authorizations.append(auth)
                        if b.api_key is not None and auth != f"Bearer {b.api_key}":
                            self._send(401, {"error": "Unauthorized"})  # vLLM's API-key middleware
                            return
                        if b.status is not None:
                            self._send(b.status, _error("the server is not ready", "ServiceUnavailableError", b.status))
                            return
                        model = req.get("model")
                        if model not in b.models:
                            self._send(404, _error(f"The model `{model}` does not exist.", "NotFoundError", 404))
                            return
                        self._send(200, _completion(b.claim_model or str(model)))

                self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
                self._server.daemon_threads = True
                threading.Thread(target=self._server.serve_forever, daemon=True, name="chat-standin").start()
            return self._server

    def register(self, models: tuple[str, ...]) -> str:
        """A new backend serving ``models``; its base URL (``http://127.0.0.1:PORT/<prefix>``)."""
        server = self._ensure()
        prefix = secrets.token_hex(8)
        self.behaviours[prefix] = Behaviour(models=models)
        return f"http://127.0.0.1:{server.server_address[1]}/{prefix}"

    def behaviour(self, url: str) -> Behaviour:
        return self.behaviours[url.rstrip("/").rpartition("/")[2]]


def _error(message: str, type_: str, code: int) -> dict[str, Any]:
    """vLLM's OpenAI-style error body."""
    return {"object": "error", "message": message, "type": type_, "param": None, "code": code}


def _completion(model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{secrets.token_hex(8)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ready", "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "total_tokens": 13, "completion_tokens": 1},
    }


STANDIN = ChatStandIn()


def served_models(deployment: dict[str, Any]) -> tuple[str, ...]:
    """The model names a vLLM Deployment's container arguments serve."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--served-model-name"]
    if "--lora-modules" in args:
        for a in args[args.index("--lora-modules") + 1 :]:
            if a.startswith("--"):
                break
            names.append(a.partition("=")[0])
    return tuple(names)


def _selects(selector: dict[str, Any], labels: dict[str, Any]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_keys(server: Any, deployment: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(namespace, Service, port) of every port of every Service selecting the Deployment's pods."""
    ns = deployment["metadata"].get("namespace") or "default"
    labels = (deployment["spec"]["template"].get("metadata") or {}).get("labels") or {}
    keys = []
    for svc in server.list("services", ns):
        if _selects((svc.get("spec") or {}).get("selector") or {}, labels):
            for port in (svc.get("spec") or {}).get("ports") or []:
                keys.append((ns, svc["metadata"]["name"], str(port["port"])))
    return keys


def serve_deployment(server: Any, name: str, namespace: str = "default", *, timeout: float = 30) -> str:
    """Play the pods of Deployment ``name``: its Services answer chat completions like vLLM (returns the
    backend URL; :func:`behaviour_of` reaches its behaviour). Waits for the Service the operator creates with it.
    Registering again (a rollout to new arguments) replaces the backend."""
    dep = server.get(RESOURCE_DEPLOYMENTS, name, namespace)
    assert dep is not None, f"Deployment {namespace}/{name} not found"
    if not served_models(dep):  # not a vLLM Deployment: nothing to answer
        return ""
    keys = server.wait_for(lambda: service_keys(server, dep), timeout, f"no Service selects Deployment {name}")
    url = STANDIN.register(served_models(dep))
    for key in keys:
        server.emulator.service_backends[key] = url
    return url


def behaviour_of(server: Any, service: str, namespace: str = "default", port: str = "8000") -> Behaviour:
    """The behaviour of the backend registered for a Service (to make it misbehave, or see its requests)."""
    return STANDIN.behaviour(server.emulator.service_backends[(namespace, service, port)])
