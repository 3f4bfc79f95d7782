"""Test harness for the operator tests: run the real kopf operator in a thread, play the missing controllers.

No kube-apiserver runs here, so nothing turns a Job into pods or a PyTorchJob into a finished training: the
tests play those controllers by PATCHing the children's ``status`` the way each real controller does
(:func:`succeed`, :func:`fail_child`, :func:`make_available`). Everything else is real: kopf, the operator's
HTTP client, the emulator's REST semantics (resourceVersion conflicts, status subresource, label selectors,
ownerReference garbage collection).

The module also checks the harness itself (the player writes what the operator's child interpretation reads).
"""

from __future__ import annotations

import asyncio
import copy
import pathlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
import yaml

from finetune_operator import backends
from finetune_operator.api import constants as c
from finetune_operator.controller import children as ch
from finetune_operator.controller.runtime import OperatorConfig

from .emulator import EmulatorServer, players
from .emulator.players import PLAYERS, RESOURCE, player
from .install_tools import OPERATOR_SA, OPERATOR_TOKEN, installed_chart

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"
CRDS = ROOT / "crds"

FTJ = "finetunejobs.finetune.dev"


def example(name: str, *, namespace: str = "default", **spec_changes: Any) -> dict[str, Any]:
    """A FineTuneJob from manifests/examples (by file name prefix), moved to ``namespace``."""
    path = next(EXAMPLES.glob(f"{name}*.yaml"))
    doc = copy.deepcopy(next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == c.KIND))
    doc["metadata"]["namespace"] = namespace
    doc["spec"].update(spec_changes)
    return doc


def minimal(name: str = "tiny", *, backend: str = "job", **spec_changes: Any) -> dict[str, Any]:
    """A small valid FineTuneJob: one SFT stage, no download, no merge, no serve."""
    doc = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "backend": backend,
            "model": {"volume": {"claimName": "models", "subPath": "tiny"}, "template": "qwen"},
            "datasets": [{"name": "chat", "volume": {"claimName": "data", "subPath": "chat.jsonl"}}],
            "output": {"volume": {"claimName": "outputs"}},
            "stages": [{"name": "sft", "type": "sft", "datasets": ["chat"], "method": "lora"}],
            "retries": 1,
            # The preflight step has its own tests (test_operator_preflight.py); here the first child is the stage.
            "preflight": {"mode": "Disabled"},
        },
    }
    doc["spec"].update(spec_changes)
    return doc


# ------------------------------------------------------------------------------------------ playing controllers


def succeed(server: EmulatorServer, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
    """Mark a workload finished successfully, as its controller would (tests/emulator/players.py)."""
    if kind == "Deployment":
        return make_available(server, name, namespace)
    return server.patch_status(RESOURCE[kind], name, player(kind).succeeded(), namespace)


def fail_child(
    server: EmulatorServer, kind: str, name: str, namespace: str = "default", reason: str = "BackoffLimitExceeded"
) -> dict[str, Any]:
    """Mark a workload failed, as its controller would."""
    return server.patch_status(RESOURCE[kind], name, player(kind).failed(reason, "exit code 7"), namespace)


def make_available(server: EmulatorServer, name: str, namespace: str = "default", *, answer: bool = True) -> dict:
    """The Deployment rolled out and available, its pods answering chat completions (see players.py)."""
    return players.make_available(server, name, namespace, answer=answer)


def children(server: EmulatorServer, job: str, namespace: str = "default") -> list[tuple[str, str]]:
    """(kind, name) of every object labelled as a child of ``job``, by creation order."""
    out = []
    for kind, resource in RESOURCE.items():
        for obj in server.list(resource, namespace, label_selector=f"{c.LABEL_JOB}={job}"):
            out.append((int(obj["metadata"]["resourceVersion"]), kind, obj["metadata"]["name"]))
    return [(k, n) for _, k, n in sorted(out)]


def ftj_status(server: EmulatorServer, name: str, namespace: str = "default") -> dict[str, Any]:
    obj = server.get(FTJ, name, namespace)
    return (obj or {}).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((x for x in status.get("conditions") or [] if x["type"] == type_), {})


def wait_state(server: EmulatorServer, name: str, state: str, namespace: str = "default", timeout: float = 30) -> dict:
    return server.wait_for(
        lambda: (s := ftj_status(server, name, namespace)).get("state") == state and s,
        timeout,
        f"{name}: state {state} not reached (status: {ftj_status(server, name, namespace)})",
    )


def wait_child(
    server: EmulatorServer, kind: str, name: str, namespace: str = "default", timeout: float = 30, attempt: int = 1
) -> dict[str, Any]:
    """Wait for a child workload (of a given attempt) to exist."""
    return server.wait_for_object(
        RESOURCE[kind],
        name,
        namespace,
        condition=lambda o: ch.attempt_of(o) == attempt and not o["metadata"].get("deletionTimestamp"),
        timeout=timeout,
    )


def events(server: EmulatorServer, name: str, namespace: str = "default") -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about FineTuneJob ``name``, in creation order."""
    evs = server.list("events", namespace, field_selector=None)
    evs = [e for e in evs if (e.get("involvedObject") or {}).get("name") == name]
    evs.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["type"], e["reason"], e["message"]) for e in evs]


def wait_event(
    server: EmulatorServer, name: str, reason: str, namespace: str = "default", timeout: float = 20, count: int = 1
) -> list[tuple[str, str, str]]:
    """Wait for ``count`` events with ``reason`` about ``name``; return them."""
    return server.wait_for(
        lambda: (
            (found := [e for e in events(server, name, namespace) if e[1] == reason]) and len(found) >= count and found
        ),
        timeout,
        f"no {reason} event for {name}: {events(server, name, namespace)}",
    )


# ------------------------------------------------------------------------------------------ the operator


#: The examples' own registry (example 04 runs a custom worker image): the test install allows it.
EXAMPLE_IMAGE_PREFIXES = ("registry.example.com/",)


def fast_config(**overrides: Any) -> OperatorConfig:
    """The operator's default (long) resync and drift intervals, so that every reaction a test waits for comes
    from a watch event (a broken watch fails the tests instead of being covered by a resync); where a test wants
    "another look" it asks for one (:meth:`OperatorThread.wait_reconciled`). Short progress interval only."""
    kw: dict[str, Any] = {
        "allowed_image_prefixes": EXAMPLE_IMAGE_PREFIXES,
        "progress_interval": 0.3,
        "workers": 4,
        "watch_timeout": 30,
    }
    kw.update(overrides)
    return OperatorConfig(**kw)


class OperatorThread:
    """The real operator (kopf + our handlers) in a background thread with its own event loop."""

    def __init__(self, config: OperatorConfig | None = None, namespaces: tuple[str, ...] = ()) -> None:
        self.config = config or fast_config()
        self.namespaces = namespaces
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.memo: kopf.Memo | None = None
        self._reconciled = threading.Condition()
        self._reconciles: dict[tuple[str, str], int] = {}

    def start(self, timeout: float = 20) -> OperatorThread:
        import finetune_operator.controller.handlers as handlers

        self.memo = kopf.Memo({handlers.MEMO_CONFIG: self.config})

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main())
            except BaseException as exc:  # pragma: no cover - surfaced by stop()
                self.error = exc
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"operator did not start: {self.error!r}")
        self._count_reconciles()
        return self

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        ready = asyncio.Event()

        async def signal_ready() -> None:
            await ready.wait()
            self._ready.set()

        waiter = asyncio.create_task(signal_ready())
        try:
            await kopf.operator(
                standalone=True,
                clusterwide=not self.namespaces,
                namespaces=list(self.namespaces),
                stop_flag=self._stop,
                ready_flag=ready,
                memo=self.memo,
            )
        finally:
            waiter.cancel()

    @property
    def controller(self) -> Any:
        assert self.memo is not None
        return self.memo.get("finetune_controller")

    def _count_reconciles(self) -> None:
        """Wrap the reconciler so tests can wait for "the operator looked again" without sleeping."""
        reconciler = self.controller.reconciler
        inner = reconciler.reconcile

        async def counted(namespace: str, name: str, **kw: Any) -> Any:
            try:
                return await inner(namespace, name, **kw)
            finally:
                with self._reconciled:
                    key = (namespace, name)
                    self._reconciles[key] = self._reconciles.get(key, 0) + 1
                    self._reconciled.notify_all()

        reconciler.reconcile = counted

    def reconciles(self, name: str, namespace: str = "default") -> int:
        with self._reconciled:
            return self._reconciles.get((namespace, name), 0)

    def wait_reconciled(
        self, name: str, times: int = 2, namespace: str = "default", timeout: float = 30, *, deep: bool = True
    ) -> None:
        """Make the operator look at FineTuneJob ``name`` ``times`` more times, one after the other, as resync
        ticks would (``deep``: with the drift check's fresh reads), and wait for each look to finish."""
        for _ in range(times):
            with self._reconciled:
                target = self._reconciles.get((namespace, name), 0) + 1
            self.resync(name, namespace, deep=deep)
            with self._reconciled:
                ok = self._reconciled.wait_for(
                    lambda t=target: self._reconciles.get((namespace, name), 0) >= t,
                    timeout,  # type: ignore[misc]
                )
            assert ok, f"{namespace}/{name} was not reconciled again within {timeout} s"

    def resync(self, name: str, namespace: str = "default", *, deep: bool = True) -> None:
        """What one resync tick does for one job (the timer itself is left at its long default)."""
        assert self._loop is not None
        controller = self.controller
        key = (namespace, name)

        def tick() -> None:
            if deep:
                controller._deep.add(key)
            controller.queue.add_after(key, 0.0)

        self._loop.call_soon_threadsafe(tick)

    def stop(self, timeout: float = 20) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "operator did not stop"
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise self.error


@pytest.fixture()
def cluster(
    emulator_server: EmulatorServer,
    use_kubeconfig: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> EmulatorServer:
    """The emulator with our CRD applied, the chart's RBAC enforced for the operator's ServiceAccount, and this
    process's KUBECONFIG (what the in-process operator uses) carrying that ServiceAccount's token.

    Every request the operator makes is checked against what the installed chart (default values: the
    cluster-wide install) grants it, and refused with 403 otherwise; the test's own requests are unrestricted.
    """
    emulator_server.apply_crd(CRDS)
    emulator_server.ensure_namespace("ml")
    emulator_server.enforce_rbac(installed_chart(), {OPERATOR_TOKEN: OPERATOR_SA})
    operator_config = emulator_server.kubeconfig(tmp_path / "operator-kubeconfig", token=OPERATOR_TOKEN)
    monkeypatch.setenv("KUBECONFIG", str(operator_config))
    for module_name in ("kubernetes.config.kube_config", "kubernetes_asyncio.config.kube_config"):
        module = sys.modules.get(module_name)
        if module is not None:
            monkeypatch.setattr(module, "KUBE_CONFIG_DEFAULT_LOCATION", str(operator_config))
    return emulator_server


@pytest.fixture()
def operator(cluster: EmulatorServer) -> Iterator[OperatorThread]:
    """A running operator against ``cluster``; stopped after the test."""
    op = OperatorThread().start()
    try:
        yield op
    finally:
        op.stop()


# ------------------------------------------------------------------------------------------ harness self-checks


@pytest.mark.parametrize("kind", [b.kind for b in backends.REGISTRY.values()])
def test_player_writes_what_the_operator_reads(kind: str) -> None:
    body = {"kind": kind, "metadata": {"name": "x"}, "spec": {}}

    class Fake:
        def patch_status(self, resource: str, name: str, status: dict[str, Any], ns: str) -> dict[str, Any]:
            return {**body, "status": status}

    assert ch.interpret(succeed(Fake(), kind, "x")).phase == ch.Phase.SUCCEEDED  # type: ignore[arg-type]
    failed = ch.interpret(fail_child(Fake(), kind, "x", reason="Boom"))  # type: ignore[arg-type]
    assert failed.phase == ch.Phase.FAILED
    assert failed.reason == "Boom"


def test_every_backend_has_a_player() -> None:
    """A new backend is played in every operator test at once, or this names what is missing."""
    assert {b.kind for b in backends.REGISTRY.values()} <= set(PLAYERS)
