"""The node agent: watches the emulator's store and hands every new workload to its controller.

It acts on the store directly (no HTTP), as the other helpers that play controllers do, so the emulator's
request log keeps holding the operator's requests only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.emulator import EmulatorServer
from tests.emulator.players import RESOURCE
from tests.node_agent.buildah import Containers, Process
from tests.node_agent.controllers import Controller, DeploymentController, JobController, PyTorchJobController
from tests.node_agent.deepspeed import DeepSpeedJobController
from tests.node_agent.pods import ContainerRecord, Kubelet, PodObjects
from tests.node_agent.trainjob import TrainJobController

#: Workload kind -> its controller. The training kinds are the backend registry's (finetune_operator.backends).
CONTROLLERS: dict[str, type[Controller]] = {
    c.kind: c
    for c in (JobController, PyTorchJobController, DeepSpeedJobController, TrainJobController, DeploymentController)
}


class NodeAgent:
    """Start with :meth:`start`, stop with :meth:`stop` (kills every container, removes working containers)."""

    def __init__(self, server: EmulatorServer, root: Path, *, node_env: Mapping[str, str] | None = None) -> None:
        self.server = server
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.containers = Containers()
        self.kubelet = Kubelet(
            self.containers,
            root,
            lookup=lambda res, ns, name: self.server.get(res, name, ns),
            namespace_names=self._service_names,
            node_env=node_env,
            objects=PodObjects(server),
        )
        self._controllers: dict[str, tuple[Controller, threading.Thread]] = {}
        self._procs: dict[str, list[Process]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    # ---- helpers for controllers
    def emulator_find(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        group, _version, plural = self.server.emulator.resolve(resource)
        return self.server.emulator.find(group, plural, namespace, name)

    def _service_names(self, namespace: str) -> list[str]:
        return [s["metadata"]["name"] for s in self.server.list("services", namespace)]

    def track(self, uid: str, procs: list[Process]) -> None:
        with self._lock:
            self._procs.setdefault(uid, []).extend(procs)

    @property
    def records(self) -> list[ContainerRecord]:
        return list(self.kubelet.records)

    def processes(self, uid: str) -> list[Process]:
        with self._lock:
            return [p for p in self._procs.get(uid, []) if p.running()]

    def processes_of_kind(self, kind: str) -> list[Process]:
        return [
            p for uid, (ctrl, _t) in list(self._controllers.items()) if ctrl.kind == kind for p in self.processes(uid)
        ]

    # ---- loop
    def _scan(self) -> list[tuple[str, dict[str, Any]]]:
        """(kind, object) of every stored workload the agent runs."""
        found = []
        for kind in CONTROLLERS:
            resource = RESOURCE[kind]
            group, _version, plural = self.server.emulator.resolve(resource)
            for obj in self.server.emulator.objects_of(group, plural):
                found.append((kind, obj))
        return found

    def _loop(self) -> None:
        seen = [-1]
        while not self._stop.is_set():
            try:
                self.server.wait_for(
                    lambda: self._stop.is_set() or self.server.emulator.resource_version != seen[0], 3600
                )
            except TimeoutError:
                continue
            seen[0] = self.server.emulator.resource_version
            live: set[str] = set()
            for kind, obj in self._scan():
                uid = obj["metadata"]["uid"]
                if obj["metadata"].get("deletionTimestamp"):
                    continue
                live.add(uid)
                if uid not in self._controllers:
                    ctrl = CONTROLLERS[kind](self, obj)
                    thread = threading.Thread(
                        target=self._guard,
                        args=(ctrl,),
                        daemon=True,
                        name=f"node-agent {ctrl.kind} {ctrl.namespace}/{ctrl.name}",
                    )
                    self._controllers[uid] = (ctrl, thread)
                    thread.start()
            for uid, (ctrl, _thread) in list(self._controllers.items()):
                if uid not in live and not ctrl.stopped.is_set():
                    ctrl.stopped.set()  # deleted: its pods go away
                    for proc in self.processes(uid):
                        proc.kill()

    def _guard(self, ctrl: Controller) -> None:
        try:
            ctrl.run()
        except BaseException as exc:  # surfaced by the tests through agent.errors
            self.errors.append(exc)

    def start(self) -> NodeAgent:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="node-agent")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.server.emulator.changed:
            self.server.emulator.changed.notify_all()
        for ctrl, _thread in self._controllers.values():
            ctrl.stopped.set()
        with self._lock:
            procs = [p for ps in self._procs.values() for p in ps]
        for proc in procs:
            proc.kill()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.popen.wait(30)
        if self._thread is not None:
            self._thread.join(10)
        for _ctrl, thread in self._controllers.values():
            thread.join(30)
        self.containers.close()
