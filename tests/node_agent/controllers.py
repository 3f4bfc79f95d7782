"""The workload controllers, played for real: pods run in their images, status is written back from exit codes.

One class per kind, in a registry (:data:`CONTROLLERS`); each runs in its own thread for one object (by uid)
until the object is finished or deleted. What each writes is what the real controller writes and what the
operator reads (finetune_operator.controller.children):

``Job`` (batch/v1)
    Waits while ``spec.suspend``; runs one pod, or one per index for ``completionMode: Indexed``
    (``JOB_COMPLETION_INDEX`` env and annotation, hostname ``<job>-<index>``, the ``subdomain``'s pod DNS
    names resolving to this machine). A failed pod is replaced until more than ``backoffLimit`` pods failed
    (``Failed``/``BackoffLimitExceeded``); ``podFailurePolicy`` ``FailJob`` on an exit code fails at once
    (``PodFailurePolicy``); all indexes succeeded → ``SuccessCriteriaMet`` + ``Complete``.
``PyTorchJob`` (kubeflow.org/v1)
    Master + Worker replicas (pods ``<job>-master-0``, ``<job>-worker-<i>``) with the environment Kubeflow's
    training-operator injects (``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``/``PET_*``);
    conditions ``Created``, ``Running``, then ``Succeeded`` when the master exits 0 (the default success
    policy) or ``Failed`` when a replica fails with a permanent exit code (``restartPolicy: ExitCode``:
    1-127) or retryable failures exceed ``runPolicy.backoffLimit``.
``DeepSpeedJob`` (batch.tensorstack.dev/v1beta1)
    What T9k's controller does: worker pods start sshd; a launcher runs DeepSpeed's multi-node launcher with
    a hostfile over SSH into them; ``status.phase`` (:mod:`tests.node_agent.deepspeed`).
``TrainJob`` (trainer.kubeflow.org/v1alpha1)
    What Kubeflow Trainer v2, JobSet and the Job controller do together (:mod:`tests.node_agent.trainjob`).
``Deployment`` (apps/v1)
    ``spec.replicas`` pods (restarted when they exit, ``restartPolicy: Always``); ``availableReplicas`` counts
    the pods whose rendered readiness probe (``httpGet`` on the named port) answers 2xx; a new generation rolls
    the pods; ``observedGeneration``, ``updatedReplicas``, condition ``Available``. Once ready, the Services
    selecting the pods are routed to them in the API server's Service proxy (``service_backends``).
"""

from __future__ import annotations

import contextlib
import secrets
import string
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from finetune_operator import backends
from tests.emulator.players import RESOURCE
from tests.node_agent.pods import ConfigError, ContainerRecord, Pod, PodError

if TYPE_CHECKING:
    from tests.node_agent.agent import NodeAgent

Result = tuple[int, str]  # (exit code, message)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def condition(ctype: str, reason: str, message: str = "") -> dict[str, Any]:
    t = now()
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": t,
        "lastTransitionTime": t,
    }


class Controller:
    """Base: one thread per workload object."""

    kind = ""

    @property
    def resource(self) -> str:
        """Where the emulator keeps this kind (from the backend registry, via the players' table)."""
        return RESOURCE[self.kind]

    def __init__(self, agent: NodeAgent, obj: dict[str, Any]) -> None:
        self.agent = agent
        self.name = obj["metadata"]["name"]
        self.namespace = obj["metadata"]["namespace"]
        self.uid = obj["metadata"]["uid"]
        self.stopped = threading.Event()

    # ---- store access
    def current(self) -> dict[str, Any] | None:
        obj = self.agent.server.get(self.resource, self.name, self.namespace)
        if obj is None or obj["metadata"]["uid"] != self.uid or obj["metadata"].get("deletionTimestamp"):
            return None
        return obj

    def patch_status(self, status: dict[str, Any]) -> None:
        if self.current() is not None:
            self.agent.server.patch_status(self.resource, self.name, status, self.namespace)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 3600) -> dict[str, Any] | None:
        """Block until the object satisfies ``predicate`` (None when it is gone or the agent stops)."""

        def check() -> Any:
            if self.stopped.is_set():
                return ("gone",)
            obj = self.agent.emulator_find(self.resource, self.namespace, self.name)
            if obj is None or obj["metadata"]["uid"] != self.uid or obj["metadata"].get("deletionTimestamp"):
                return ("gone",)
            return ("ok", obj) if predicate(obj) else None

        got = self.agent.server.wait_for(check, timeout, f"{self.kind} {self.namespace}/{self.name}")
        return got[1] if got[0] == "ok" else None

    # ---- pods
    def pod_labels(self) -> dict[str, str]:
        """Labels this controller adds to its pods besides the template's (the Job controller's own)."""
        return {}

    def run_pod(self, pod: Pod) -> Result:
        """Run every container of ``pod`` to the end (its Pod object written: tests/node_agent/pods.py); (first
        non-zero exit code or 0, message). A pod waiting for a missing Secret waits (it does not fail)."""
        pod.owner = pod.owner or {
            "apiVersion": backend.api_version if (backend := backends.by_kind(self.kind)) else "v1",
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        pod.labels = {**self.pod_labels(), **pod.labels}
        while True:
            try:
                started = self.agent.kubelet.start(pod, self.agent.logs)
                break
            except ConfigError:  # the kubelet tries again until the Secret appears or the workload is deleted
                if self.stopped.wait(1.0) or self.current() is None:
                    return 1, f"pod {pod.name}: deleted while its configuration could not be resolved"
            except (PodError, LookupError, OSError, subprocess.SubprocessError) as exc:
                return 1, f"pod {pod.name}: {exc}"
        self.agent.track(self.uid, [p for _, p in started])
        code, message = 0, ""
        for record, proc in started:
            record.exit_code = proc.wait()
            if record.exit_code != 0 and code == 0:
                code = record.exit_code
                message = f"pod {pod.name} container {record.container} exited with code {code}"
        self.agent.kubelet.finish(pod, [r for r, _ in started])
        return code, message

    def run(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------


class JobController(Controller):
    kind = "Job"

    def pod_labels(self) -> dict[str, str]:
        # What the Job controller sets on every pod (Kubernetes 1.27+ and the legacy names).
        return {
            "batch.kubernetes.io/job-name": self.name,
            "job-name": self.name,
            "batch.kubernetes.io/controller-uid": self.uid,
            "controller-uid": self.uid,
        }

    def _fail_job_codes(self, spec: dict[str, Any]) -> set[int]:
        codes: set[int] = set()
        for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
            on = rule.get("onExitCodes")
            if rule.get("action") == "FailJob" and on and on.get("operator", "In") == "In":
                codes |= {int(v) for v in on.get("values") or []}
        return codes

    def run(self) -> None:
        obj = self.wait(lambda o: not (o.get("spec") or {}).get("suspend"))
        if obj is None:
            return
        spec = obj["spec"]
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions") or 1)
        backoff = int(spec.get("backoffLimit", 6))
        fail_codes = self._fail_job_codes(spec)
        template = spec["template"]
        subdomain = template["spec"].get("subdomain")
        start_time = now()
        failed = 0
        pending = list(range(completions))
        succeeded: set[int] = set()
        while pending:
            self.patch_status(
                {
                    "startTime": start_time,
                    "active": len(pending),
                    "failed": failed or None,
                    "succeeded": len(succeeded) or None,
                }
            )
            results: dict[int, Result] = {}

            def one(index: int, results: dict[int, Result] = results) -> None:
                hostname = f"{self.name}-{index}" if indexed else f"{self.name}-{suffix()}"
                pod = Pod(
                    namespace=self.namespace,
                    name=f"{hostname}-{suffix()}" if indexed else hostname,
                    template=template,
                    hostname=hostname,
                    subdomain=subdomain,
                    extra_env={"JOB_COMPLETION_INDEX": str(index)} if indexed else {},
                    annotations={"batch.kubernetes.io/job-completion-index": str(index)} if indexed else {},
                    hosts=[
                        f"{self.name}-{i}.{subdomain}{tail}"
                        for i in range(completions)
                        for tail in ("", f".{self.namespace}.svc", f".{self.namespace}.svc.cluster.local")
                    ]
                    if subdomain
                    else (),
                )
                results[index] = self.run_pod(pod)

            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in pending]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if self.current() is None:
                return
            pending = []
            for index, (code, message) in sorted(results.items()):
                if code == 0:
                    succeeded.add(index)
                    continue
                failed += 1
                if code in fail_codes:
                    msg = f"{message}, matching FailJob rule of the podFailurePolicy"
                    self._failed("PodFailurePolicy", msg, failed, len(succeeded))
                    return
                pending.append(index)
            if pending and failed > backoff:
                self._failed(
                    "BackoffLimitExceeded", "Job has reached the specified backoff limit", failed, len(succeeded)
                )
                return
        done = now()
        self.patch_status(
            {
                "active": None,
                "succeeded": len(succeeded),
                "failed": failed or None,
                "completionTime": done,
                "conditions": [
                    condition(t, "CompletionsReached", "Reached expected number of succeeded pods")
                    for t in ("SuccessCriteriaMet", "Complete")
                ],
            }
        )

    def _failed(self, reason: str, message: str, failed: int, succeeded: int) -> None:
        self.patch_status(
            {
                "active": None,
                "failed": failed,
                "succeeded": succeeded or None,
                "conditions": [condition("FailureTarget", reason, message), condition("Failed", reason, message)],
            }
        )


# ----------------------------------------------------------------------------------------------------------


class PyTorchJobController(Controller):
    kind = "PyTorchJob"
    #: The training-operator's default rendezvous port (a container port named pytorchjob-port overrides it).
    #: In a cluster every pod has its own network; here all share one, so the agent picks a free port instead
    #: (two PyTorchJobs at once, or two test sessions on one machine, would otherwise collide).
    DEFAULT_PORT = 23456

    def run(self) -> None:
        obj = self.wait(lambda o: not ((o.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
        if obj is None:
            return
        spec = obj["spec"]
        replicas = spec["pytorchReplicaSpecs"]
        backoff = int((spec.get("runPolicy") or {}).get("backoffLimit", 6) or 0)
        nproc = int(spec.get("nprocPerNode") or 1)
        roles = [("Master", i) for i in range(int(replicas["Master"].get("replicas", 1)))]
        roles += [("Worker", i) for i in range(int((replicas.get("Worker") or {}).get("replicas", 0)))]
        nnodes = len(roles)
        master = f"{self.name}-master-0"
        port = _free_port()
        for p in replicas["Master"]["template"]["spec"]["containers"][0].get("ports") or []:
            if p.get("name") == "pytorchjob-port":
                port = int(p["containerPort"])
        hosts = [f"{self.name}-{role.lower()}-{i}" for role, i in roles]
        conditions = [condition("Created", "PyTorchJobCreated", f"PyTorchJob {self.name} is created.")]
        restarts = 0
        while True:
            conditions.append(condition("Running", "PyTorchJobRunning", f"PyTorchJob {self.name} is running."))
            self.patch_status(
                {"startTime": now(), "conditions": conditions, "replicaStatuses": {r: {"active": 1} for r in replicas}}
            )
            results: dict[tuple[str, int], Result] = {}

            def one(role: str, index: int, results: dict[tuple[str, int], Result] = results) -> None:
                rank = 0 if role == "Master" else index + 1
                env = {
                    "MASTER_ADDR": master,
                    "MASTER_PORT": str(port),
                    "WORLD_SIZE": str(nnodes * nproc),
                    "RANK": str(rank),
                    "PET_NNODES": str(nnodes),
                    "PET_NPROC_PER_NODE": str(nproc),
                    "PET_NODE_RANK": str(rank),
                    "PET_MASTER_ADDR": master,
                    "PET_MASTER_PORT": str(port),
                    "PYTHONUNBUFFERED": "1",
                }
                hostname = f"{self.name}-{role.lower()}-{index}"
                pod = Pod(self.namespace, hostname, replicas[role]["template"], hostname, extra_env=env, hosts=hosts)
                results[(role, index)] = self.run_pod(pod)
                if results[(role, index)][0] != 0:
                    # One replica failed: the training-operator tears the others down (they would wait for
                    # their peer forever).
                    for proc in self.agent.processes(self.uid):
                        proc.kill()

            threads = [threading.Thread(target=one, args=r, daemon=True) for r in roles]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if self.current() is None:
                return
            bad = [(k, r) for k, r in results.items() if r[0] != 0]
            if not bad:
                conditions[-1]["status"] = "False"
                conditions.append(
                    condition("Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {self.name} is successfully completed.")
                )
                self.patch_status(
                    {
                        "completionTime": now(),
                        "conditions": conditions,
                        "replicaStatuses": {r: {"succeeded": 1} for r in replicas},
                    }
                )
                return
            (role, _), (code, message) = bad[0]
            retryable = code > 127  # restartPolicy ExitCode: signals are retryable, 1-127 are permanent
            if retryable and restarts < backoff:
                restarts += 1
                conditions.append(condition("Restarting", "PyTorchJobRestarting", message))
                continue
            conditions[-1]["status"] = "False"
            conditions.append(condition("Failed", "PyTorchJobFailed", message))
            self.patch_status({"conditions": conditions, "replicaStatuses": {role: {"failed": 1}}})
            return


# ----------------------------------------------------------------------------------------------------------


class DeploymentController(Controller):
    kind = "Deployment"

    def _probe_ok(self, template: dict[str, Any]) -> bool:
        container = template["spec"]["containers"][0]
        probe = container.get("readinessProbe") or {}
        http = probe.get("httpGet")
        if not http:
            return True
        port = http["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}{http.get('path', '/')}", timeout=int(probe.get("timeoutSeconds", 1))
            ) as resp:
                return 200 <= resp.status < 400
        except (urllib.error.URLError, OSError):
            return False

    def run(self) -> None:
        generation = 0
        procs: list[Any] = []
        ready = False
        record_list: list[ContainerRecord] = []
        while True:
            obj = self.current()
            if obj is None or self.stopped.is_set():  # stopped: no restart (vLLM left behind holds its port)
                break
            gen = int(obj["metadata"].get("generation") or 1)
            want = int(obj["spec"].get("replicas", 1))
            template = obj["spec"]["template"]
            if gen != generation:
                # New template or scale: replace the pods (one replica can run per port on a shared network).
                for p in procs:
                    p.kill()
                    p.wait(30)
                procs, ready, generation = [], False, gen
                if want > 0:
                    pod = Pod(self.namespace, f"{self.name}-{suffix()}-{suffix()}", template, f"{self.name}-{suffix()}")
                    try:
                        started = self.agent.kubelet.start(pod, self.agent.logs)
                    except PodError as exc:
                        self.patch_status(
                            {
                                "observedGeneration": gen,
                                "conditions": [
                                    condition("Progressing", "FailedCreate", str(exc)) | {"status": "False"}
                                ],
                            }
                        )
                        return
                    record_list = [r for r, _ in started]
                    procs = [p for _, p in started]
                    self.agent.track(self.uid, procs)
                self.patch_status(
                    {
                        "observedGeneration": gen,
                        "replicas": want,
                        "updatedReplicas": want,
                        "readyReplicas": 0,
                        "availableReplicas": 0,
                        "unavailableReplicas": want,
                        "conditions": [condition("Progressing", "ReplicaSetUpdated")],
                    }
                )
            if procs and not all(p.running() for p in procs):
                for r, p in zip(record_list, procs, strict=True):
                    if not p.running():
                        r.exit_code = p.wait(5)
                self.patch_status(
                    {
                        "readyReplicas": 0,
                        "availableReplicas": 0,
                        "conditions": [condition("Available", "MinimumReplicasUnavailable") | {"status": "False"}],
                    }
                )
                generation = 0  # restart (restartPolicy: Always)
                time.sleep(2)
                continue
            if procs and not ready and self._probe_ok(template):
                ready = True
                self._route_services(template)
                self.patch_status(
                    {
                        "readyReplicas": want,
                        "availableReplicas": want,
                        "unavailableReplicas": None,
                        "conditions": [
                            condition("Progressing", "NewReplicaSetAvailable"),
                            condition("Available", "MinimumReplicasAvailable"),
                        ],
                    }
                )
            # The kubelet probes on a period; between probes, wake up early on a change of the object.
            period = 1.0 if not ready else 5.0
            self.wait_changed(gen, period)
        for p in procs:
            p.kill()

    def _route_services(self, template: dict[str, Any]) -> None:
        """Play kube-proxy for the API server's Service proxy: each Service selecting these pods reaches them
        on 127.0.0.1 at the container port its targetPort names (the operator's answer check goes there)."""
        labels = (template.get("metadata") or {}).get("labels") or {}
        ports = {p.get("name"): p["containerPort"] for p in template["spec"]["containers"][0].get("ports") or []}
        for svc in self.agent.server.list("services", self.namespace):
            selector = (svc.get("spec") or {}).get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for port in svc["spec"].get("ports") or []:
                target = port.get("targetPort", port["port"])
                target = ports.get(target, target) if isinstance(target, str) else target
                key = (self.namespace, svc["metadata"]["name"], str(port["port"]))
                self.agent.server.emulator.service_backends[key] = f"http://127.0.0.1:{target}"

    def wait_changed(self, generation: int, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            self.wait(lambda o: int(o["metadata"].get("generation") or 1) != generation, timeout)
