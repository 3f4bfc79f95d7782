"""One recorded session of the real operator, started exactly as the Helm chart starts it.

``ftctl operator`` runs as a subprocess with the arguments and environment of the chart's rendered
Deployment, against the API-server emulator. A scenario drives every code path that touches the API: the
three training backends (Job, PyTorchJob, DeepSpeedJob), a failed stage that is retried, suspend and resume,
serving with a later scale, and a model download whose hub token comes from a Secret holding a canary value.

What comes out (:class:`Session`) feeds two proofs:

- tests/test_rbac.py: every API request the operator made is allowed by the chart's RBAC, and every
  permission the chart grants was used;
- tests/test_secrets_canary.py: the canary token appears in no object, status, event, annotation or log line.

The emulator's helpers used to play the cluster's controllers act on its store directly (no HTTP), so the
request log holds the operator's requests only.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api import constants as c
from tests.emulator import EmulatorServer, RequestRecord
from tests.emulator.players import PLAYERS, RESOURCE, make_available
from tests.emulator.players import player as play
from tests.install_tools import EXAMPLES, OPERATOR_SA, OPERATOR_TOKEN, ROOT, find_helm, one, render_chart

CANARY = "hf_CANARY-7f3c9e1d-never-print-me"
#: Example 04 runs a worker image of its own registry: the install allows it, as an admin would.
ALLOWED_IMAGE_PREFIXES = ("registry.example.com/",)
TOKEN_SECRET = {"name": "hf-token", "key": "token"}
FTJ = "finetunejobs.finetune.dev"


@dataclass
class Session:
    """What a recorded operator session leaves behind."""

    mode: str
    chart_objects: list[dict[str, Any]]
    requests: list[RequestRecord]
    operator_log: str
    objects: list[dict[str, Any]] = field(default_factory=list)
    final_states: dict[str, str] = field(default_factory=dict)
    #: (HTTP status, body) of the chart's liveness probe path and of /metrics, asked on the chart's ports
    #: once the operator had run the whole scenario.
    probes: dict[str, tuple[int, str]] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError as exc:
        return 0, str(exc)


def _example(prefix: str, namespace: str) -> dict[str, Any]:
    path = next(EXAMPLES.glob(f"{prefix}*.yaml"))
    doc = next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == c.KIND)
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return dict(doc)


def operator_command(
    chart_objects: list[dict[str, Any]], health_port: int, metrics_port: int
) -> tuple[list[str], dict[str, str]]:
    """``ftctl`` + the Deployment's args (ports moved to free ones) and its literal env values."""
    deployment = one(chart_objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = []
    for arg in container["args"]:
        if arg.startswith("--liveness-port="):
            arg = f"--liveness-port={health_port}"
        elif arg.startswith("--metrics-port="):
            arg = f"--metrics-port={metrics_port}"
        args.append(arg)
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return [str(Path(sys.executable).parent / "ftctl"), *args], env


class Player:
    """Plays the controllers of the workloads (the emulator runs none) and waits on the store."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def status(self, name: str, ns: str) -> dict[str, Any]:
        obj = self.server.get(FTJ, name, ns)
        return dict((obj or {}).get("status") or {})

    def wait(self, predicate: Callable[[], Any], message: str, timeout: float = 30) -> Any:
        return self.server.wait_for(predicate, timeout, message)

    def wait_child(self, kind: str, name: str, ns: str, attempt: int = 1) -> dict[str, Any]:
        def ready() -> Any:
            obj = self.server.get(RESOURCE[kind], name, ns)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None
            found = obj["metadata"].get("annotations", {}).get(c.ANNOTATION_ATTEMPT, "1")
            return obj if str(found) == str(attempt) else None

        return dict(self.wait(ready, f"{kind} {ns}/{name} attempt {attempt} never appeared"))

    def succeed(self, kind: str, name: str, ns: str) -> None:
        if kind in PLAYERS:
            self.server.patch_status(RESOURCE[kind], name, play(kind).succeeded(), ns)
        else:  # the Deployment: rolled out, its pods answering chat completions through the Service
            make_available(self.server, name, ns)

    def fail(self, kind: str, name: str, ns: str) -> None:
        self.server.patch_status(RESOURCE[kind], name, play(kind).failed("BackoffLimitExceeded", "exit code 7"), ns)

    def answer(self, name: str, ns: str) -> None:
        """Play the answer Job of a Service with an API key: its pod answered ok (termination message), it
        succeeded (as the Job controller and the kubelet would report it)."""
        selector = f"{c.LABEL_JOB}={name},{c.LABEL_COMPONENT}=answer"
        job = self.wait(
            lambda: next(iter(self.server.list(RESOURCE["Job"], ns, label_selector=selector)), None), "no answer Job"
        )
        job_name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        pod = self.server.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job_name[:50]}-abcde",
                    "namespace": ns,
                    "labels": {"batch.kubernetes.io/job-name": job_name},
                    "ownerReferences": [
                        {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid, "controller": True}
                    ],
                },
                "spec": {"containers": [{"name": "worker", "image": "worker"}], "restartPolicy": "Never"},
            }
        )
        terminated = {
            "exitCode": 0,
            "reason": "Completed",
            "message": '{"answer": "ok"}',
            "finishedAt": "2026-01-01T00:00:00Z",
        }
        self.server.patch_status(
            "pods",
            pod["metadata"]["name"],
            {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "worker",
                        "ready": False,
                        "restartCount": 0,
                        "image": "worker",
                        "imageID": "",
                        "state": {"terminated": terminated},
                    }
                ],
            },
            ns,
        )
        self.server.patch_status(RESOURCE["Job"], job_name, play("Job").succeeded(), ns)

    def steps(self, doc: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(step kind, workload kind, workload name) in pipeline order, from the pure renderer."""
        from finetune_operator.controller.runtime import OperatorConfig, make_render, make_validate

        config = OperatorConfig(allowed_image_prefixes=ALLOWED_IMAGE_PREFIXES)
        plan = make_render(config)(make_validate(config)(doc))
        return [(s.kind, s.workload["kind"], s.workload["metadata"]["name"]) for s in plan.steps]

    def run_pipeline(
        self,
        doc: dict[str, Any],
        *,
        fail_first: str | None = None,
        suspend_at: str | None = None,
    ) -> str:
        """Create ``doc`` and play each step to success; return the final state."""
        name, ns = doc["metadata"]["name"], doc["metadata"]["namespace"]
        self.server.create(doc)
        for step_kind, kind, child in self.steps(doc):
            self.wait_child(kind, child, ns)
            if step_kind == fail_first:
                self.fail(kind, child, ns)
                self.wait_child(kind, child, ns, attempt=2)
            if step_kind == suspend_at:
                self.server.patch(FTJ, name, {"spec": {"suspend": True}}, ns)
                self.wait(lambda: self.status(name, ns).get("state") == "Suspended", f"{name} not suspended")
                self.server.patch(FTJ, name, {"spec": {"suspend": False}}, ns)
                self.wait(lambda: self.status(name, ns).get("state") == "Running", f"{name} not resumed")
            self.succeed(kind, child, ns)
        if (doc["spec"].get("serve") or {}).get("apiKeySecretRef"):
            self.answer(name, ns)
        final = "Serving" if any(s[0] == "serve" for s in self.steps(doc)) else "Succeeded"
        self.wait(
            lambda: self.status(name, ns).get("state") == final, f"{name}: {final} not reached: {self.status(name, ns)}"
        )
        return final


def record_session(mode: str) -> Session:
    """Run the scenario with the chart rendered for ``mode`` ("cluster-wide" or "namespaced")."""
    values: dict[str, Any] = {} if mode == "cluster-wide" else {"watchNamespaces": ["ml", "research"]}
    values["policy"] = {"allowedImagePrefixes": list(ALLOWED_IMAGE_PREFIXES)}
    with tempfile.TemporaryDirectory(prefix="ft-operator-session-") as tmp_dir:
        tmp = Path(tmp_dir)
        chart_objects = render_chart(find_helm(), values, tmp_path=tmp)
        server = EmulatorServer().start()
        log_path = tmp / "operator.log"
        proc: subprocess.Popen[bytes] | None = None
        try:
            server.apply_crd(ROOT / "crds")
            for ns in ("ml", "research"):
                server.ensure_namespace(ns)
                server.create(
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {"name": TOKEN_SECRET["name"], "namespace": ns},
                        "type": "Opaque",
                        "stringData": {TOKEN_SECRET["key"]: CANARY},
                        "data": {},
                    }
                )
            health_port, metrics_port = _free_port(), _free_port()
            cmd, chart_env = operator_command(chart_objects, health_port, metrics_port)
            # The operator runs as the chart's ServiceAccount: the emulator refuses (403) what the chart rendered
            # for this mode does not grant it, so a missing rule fails the scenario itself.
            server.enforce_rbac(chart_objects, {OPERATOR_TOKEN: OPERATOR_SA})
            env = server.env(server.kubeconfig(tmp / "kubeconfig", token=OPERATOR_TOKEN))
            env.update(chart_env)
            # Small intervals so that the scenario waits for events, not for timers.
            # Default (long) resync: every reaction the scenario waits for must come from a watch.
            env.update({"FT_PROGRESS_INTERVAL_SECONDS": "0.2", "PYTHONUNBUFFERED": "1"})
            with log_path.open("wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
            player = Player(server)
            states: dict[str, str] = {}
            answers: dict[str, tuple[int, str]] = {}
            threads = []
            errors: list[BaseException] = []

            def scenario(key: str, fn: Callable[[], str]) -> None:
                try:
                    states[key] = fn()
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            jobs: list[tuple[str, Callable[[], str]]] = [
                # Job backend with a download whose token comes from the Secret; the SFT stage fails once.
                ("ml/llama3-lora-sft", lambda: player.run_pipeline(_example("01-", "ml"), fail_first="train")),
                # Job backend, suspended and resumed while training.
                ("ml/qwen-qlora", lambda: player.run_pipeline(_example("02-", "ml"), suspend_at="train")),
                # PyTorchJob (two nodes) that fails once and is suspended, then serving.
                (
                    "research/mistral-full-sft",
                    lambda: player.run_pipeline(_example("03-", "research"), fail_first="train", suspend_at="train"),
                ),
                # DeepSpeedJob stages that fail once and are paused, then serving.
                (
                    "ml/assistant-dpo",
                    lambda: player.run_pipeline(_example("04-", "ml"), fail_first="train", suspend_at="train"),
                ),
            ]
            # Trainer v2 TrainJob (two nodes) that fails once and is suspended, then merged.
            trainer = _example("07-", "ml")
            del trainer["spec"]["scheduling"]["queueName"]  # no Kueue here: nothing would admit it
            jobs.append(
                (
                    "ml/llama-support-trainer",
                    lambda: player.run_pipeline(trainer, fail_first="train", suspend_at="train"),
                )
            )
            # Serving with an API key from the canary Secret: the answer Job checks it from inside the cluster.
            keyed = _example("05-", "ml")
            keyed["metadata"]["name"] = "keyed-faq"
            del keyed["spec"]["scheduling"]["queueName"]
            keyed["spec"]["serve"]["apiKeySecretRef"] = dict(TOKEN_SECRET)
            jobs.append(("ml/keyed-faq", lambda: player.run_pipeline(keyed)))
            for key, fn in jobs:
                thread = threading.Thread(target=scenario, args=(key, fn), name=key)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join(180)
            if errors:
                raise errors[0]
            # Scale the serving Deployment of a finished job (the operator patches it).
            server.patch(FTJ, "assistant-dpo", {"spec": {"serve": {"replicas": 3}}}, "ml")
            player.wait(
                lambda: (
                    (server.get("deployments.apps", "assistant-dpo-serve", "ml") or {}).get("spec", {}).get("replicas")
                    == 3
                ),
                "the serving Deployment was not scaled",
            )
            container = one(chart_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
            probes = {
                "liveness": (health_port, container["livenessProbe"]["httpGet"]["path"]),
                "readiness": (health_port, container["readinessProbe"]["httpGet"]["path"]),
                "metrics": (metrics_port, "/metrics"),
            }
            answers = {key: _http_get(port, path) for key, (port, path) in probes.items()}
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            requests = list(server.emulator.request_log)
            objects = [copy.deepcopy(obj) for _, obj in server.emulator.iter_all()]
            server.stop()
        return Session(
            mode=mode,
            chart_objects=chart_objects,
            requests=requests,
            operator_log=log_path.read_text(errors="replace") if log_path.exists() else "",
            objects=objects,
            final_states=states,
            probes=answers,
        )


_CACHE: dict[str, Session] = {}
_LOCK = threading.Lock()


def session(mode: str) -> Session:
    """The recorded session for ``mode``, run once per test process (both proofs share it)."""
    with _LOCK:
        if mode not in _CACHE:
            _CACHE[mode] = record_session(mode)
        return _CACHE[mode]


if __name__ == "__main__":  # a quick look at what the operator does: python -m tests.operator_session
    result = session(sys.argv[1] if len(sys.argv) > 1 else "cluster-wide")
    for rec in sorted({(r.verb, r.group, r.resource, r.subresource or "", r.namespace or "") for r in result.requests}):
        print(*rec)
    print(result.final_states)
    if os.environ.get("SHOW_LOG"):
        print(result.operator_log)
