"""Run a ``FidelityEmulator`` on 127.0.0.1 in a background thread, with test helpers.

Why a thread with its own event loop: the same server must serve synchronous tests (kopf's ``KopfRunner``
runs the operator in its own thread; ``kubectl`` and ``ftctl operator`` run as subprocesses) and asynchronous
tests (pytest-asyncio's loop is per test).  A server on the test's loop would freeze whenever a sync test
blocks.  All mutations are marshalled onto the server loop; reads take ``emulator.state_lock`` and waits use
``emulator.changed`` (a condition variable notified on every stored change), so no helper polls with sleeps.

We serve with aiohttp's low-level server instead of ``kmock.Server``: the latter patches aiohttp's resolver
class-wide (for the in-process client it offers), which would leak into kopf's aiohttp sessions and breaks when
two servers stop in a different order than they started.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import copy
import os
import pathlib
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp.web
import yaml

from finetune_operator import backends

from . import patching
from .emulator import CRD_KEY, FidelityEmulator, Route
from .errors import ApiError

T = TypeVar("T")

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

#: Discovery details of the upstream CRDs (printer columns, short names), by kind.
_CRD_DETAILS: dict[str, dict[str, Any]] = {
    # The printer columns of Kubeflow's own PyTorchJob CRD (training-operator manifests).
    "PyTorchJob": {
        "categories": ["kubeflow"],
        "printer_columns": [
            {"name": "State", "type": "string", "jsonPath": ".status.conditions[-1:].type"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
    "DeepSpeedJob": {"shortnames": ["dj"]},
    # Kubeflow Trainer v2's TrainJob CRD (tests/fixtures/crds/trainer.kubeflow.org_trainjobs.yaml).
    "TrainJob": {
        "printer_columns": [
            {"name": "State", "type": "string", "jsonPath": ".status.conditions[-1:].type"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]
    },
}

#: Resources of other projects' controllers our operator creates (declared as their CRDs would): every training
#: backend's workload that is not built into Kubernetes, from the backend registry.
EXTRA_RESOURCES: tuple[dict[str, Any], ...] = tuple(
    {"resource": f"{b.api_version}/{b.plural}", "kind": b.kind, **_CRD_DETAILS.get(b.kind, {})}
    for b in backends.REGISTRY.values()
    if b.api_version != "batch/v1"  # built in: kmock's bundle has it
)


def make_emulator(**kwargs: Any) -> FidelityEmulator:
    """An emulator with the built-in resources (kmock's bundle) plus every backend's custom workload kind."""
    emulator = FidelityEmulator(**kwargs)
    with warnings.catch_warnings():  # kmock 0.8 uses the deprecated importlib.resources.read_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    for spec in EXTRA_RESOURCES:
        emulator.register(**spec)
    return emulator


class EmulatorServer:
    """A started emulator plus synchronous helpers that tests (and the operator's tests) use.

    Resources are named as kubectl would: ``'jobs'``, ``'ftj'``, ``'FineTuneJob'``, ``'jobs.batch'`` or
    ``'batch/v1/jobs'``.  Objects handed out are deep copies; mutate them freely.
    """

    def __init__(
        self,
        emulator: FidelityEmulator | None = None,
        *,
        host: str = "127.0.0.1",
        namespaces: Iterable[str] = DEFAULT_NAMESPACES,
    ) -> None:
        self.emulator = emulator if emulator is not None else make_emulator()
        self.host = host
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._namespaces = tuple(namespaces)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._run, name=f"k8s-emulator-{id(self):x}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulator did not start within 30 s")
        if self._error is not None:
            raise RuntimeError("the emulator failed to start") from self._error
        for namespace in self._namespaces:
            self.ensure_namespace(namespace)
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        async with self.emulator:
            server = aiohttp.web.Server(self.emulator)
            runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1)
            await runner.setup()
            site = aiohttp.web.SockSite(runner, sock)
            await site.start()
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                self.emulator.drop_watches()  # end open streams, or cleanup waits for them
                await runner.cleanup()

    # ------------------------------------------------------------------ marshalling

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the server loop (where all writes must happen) and return its result."""
        assert self.loop is not None, "the emulator is not started"
        if self._thread is not None and threading.current_thread() is self._thread:
            return fn(*args, **kwargs)

        async def run() -> T:
            return fn(*args, **kwargs)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(timeout=60)

    # ------------------------------------------------------------------ helpers

    def _route(self, resource: str, name: str | None, namespace: str | None, subresource: str | None = None) -> Route:
        group, version, plural = self.emulator.resolve(resource)
        info = self.emulator.info(group, version, plural)
        ns = namespace if info is not None and info.namespaced else None
        return Route("resource", group, version, plural, ns, name, subresource)

    def ensure_namespace(self, name: str) -> dict[str, Any]:
        existing = self.get("namespaces", name)
        if existing is not None:
            return existing
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """POST an object (resource from its apiVersion/kind; namespace from it, the argument or default)."""
        group, version, plural = self.emulator.resolve_kind(obj["apiVersion"], obj["kind"])
        info = self.emulator.info(group, version, plural)
        ns = None
        if info is not None and info.namespaced:
            ns = namespace or obj.get("metadata", {}).get("namespace") or "default"
        body = copy.deepcopy(dict(obj))
        return copy.deepcopy(self.call(self.emulator.create_object, group, version, plural, ns, body))

    def get(self, resource: str, name: str, namespace: str | None = "default") -> dict[str, Any] | None:
        route = self._route(resource, name, namespace)
        return self.emulator.find(route.group, route.plural, route.namespace, name)

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[dict[str, Any]]:
        route = self._route(resource, None, namespace)
        query = {k: v for k, v in {"labelSelector": label_selector, "fieldSelector": field_selector}.items() if v}
        with self.emulator.state_lock:
            return copy.deepcopy(self.emulator._select((route.group, route.plural), route.namespace, query))

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        *,
        subresource: str | None = None,
        content_type: str = patching.MERGE,
    ) -> dict[str, Any]:
        route = self._route(resource, name, namespace, subresource)
        obj, _ = self.call(self.emulator.patch_object, route, content_type, patch, {"fieldManager": "test"})
        return copy.deepcopy(obj)

    def patch_status(
        self, resource: str, name: str, status: Mapping[str, Any], namespace: str | None = "default"
    ) -> dict[str, Any]:
        """Merge-patch ``status`` through the status subresource (as a controller would)."""
        return self.patch(resource, name, {"status": dict(status)}, namespace, subresource="status")

    def replace(self, resource: str, obj: Mapping[str, Any], namespace: str | None = "default") -> dict[str, Any]:
        route = self._route(resource, obj["metadata"]["name"], namespace)
        return copy.deepcopy(self.call(self.emulator.replace_object, route, copy.deepcopy(dict(obj))))

    def delete(
        self, resource: str, name: str, namespace: str | None = "default", *, propagation: str = "Background"
    ) -> dict[str, Any]:
        route = self._route(resource, name, namespace)
        obj, _ = self.call(
            self.emulator.delete_object,
            route.group,
            route.plural,
            route.namespace,
            name,
            {"propagationPolicy": propagation},
        )
        return copy.deepcopy(obj)

    def apply_crd(self, source: str | os.PathLike[str] | Mapping[str, Any]) -> builtins.list[dict[str, Any]]:
        """Create or update the CRD(s) of a YAML file/directory or a dict; registers them in discovery."""
        docs: builtins.list[Mapping[str, Any]] = []
        if isinstance(source, Mapping):
            docs = [source]
        else:
            path = pathlib.Path(source)
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            for file in files:
                docs += [d for d in yaml.safe_load_all(file.read_text()) if d]
        applied = []
        for doc in docs:
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            existing = self.get("customresourcedefinitions", doc["metadata"]["name"], None)
            if existing is None:
                applied.append(self.create(doc))
            else:
                body = copy.deepcopy(dict(doc))
                body["metadata"] = dict(body["metadata"], resourceVersion=existing["metadata"]["resourceVersion"])
                route = Route("resource", CRD_KEY[0], "v1", CRD_KEY[1], None, doc["metadata"]["name"])
                applied.append(copy.deepcopy(self.call(self.emulator.replace_object, route, body)))
        return applied

    def fail(self, verbs: str | Iterable[str], resource: str | None = None, **kwargs: Any) -> Any:
        """See ``FidelityEmulator.fail``: the next N matching requests fail (409/429/500...)."""
        return self.emulator.fail(verbs, resource, **kwargs)

    def drop_watches(self, resource: str | None = None) -> int:
        """End the open watch streams (all, or of one resource); clients must re-watch."""
        return self.call(self.emulator.drop_watches, resource)

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, message: str | None = None) -> T:
        """Block until ``predicate()`` is truthy (re-evaluated on every stored change); return its value.

        The predicate runs under the store lock, so it sees a consistent state; keep it cheap.
        """
        deadline = time.monotonic() + timeout
        with self.emulator.changed:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(message or f"condition not met within {timeout} s")
                self.emulator.changed.wait(remaining)

    async def await_for(self, predicate: Callable[[], T], timeout: float = 10.0, message: str | None = None) -> T:
        """``wait_for`` for async tests (waits in a worker thread, never blocking the test's loop)."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout, message)

    def wait_for_object(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        condition: Callable[[dict[str, Any]], Any] | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Wait until the object exists (and satisfies ``condition``); return it."""

        def check() -> dict[str, Any] | None:
            obj = self.get(resource, name, namespace)
            return obj if obj is not None and (condition is None or condition(obj)) else None

        found = self.wait_for(check, timeout, f"{resource}/{name} in {namespace}: not there/not as expected")
        assert found is not None
        return found

    def wait_for_deletion(
        self, resource: str, name: str, namespace: str | None = "default", timeout: float = 10.0
    ) -> None:
        self.wait_for(lambda: self.get(resource, name, namespace) is None, timeout, f"{resource}/{name} not deleted")

    # ------------------------------------------------------------------ client configuration

    def enforce_rbac(self, objects: Iterable[Mapping[str, Any]], tokens: Mapping[str, tuple[str, str]]) -> Any:
        """Enforce the RBAC objects of an install for ``tokens`` (token -> (namespace, ServiceAccount)); other
        tokens stay unrestricted. Returns the :class:`tests.emulator.rbac.Authorizer` (its ``denied`` list)."""
        from .rbac import Authorizer

        auth = self.emulator.authorizer
        if auth is None:
            auth = self.emulator.authorizer = Authorizer()
        auth.install(objects)
        for token, (namespace, account) in tokens.items():
            auth.bind_token(token, namespace, account)
        return auth

    def kubeconfig(
        self, path: str | os.PathLike[str], namespace: str = "default", token: str = "emulator-token"
    ) -> pathlib.Path:
        """Write a kubeconfig for this server (token auth; any token is accepted unless ``enforce_rbac`` bound
        it to a ServiceAccount)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "emulator",
        }
        target = pathlib.Path(path)
        target.write_text(yaml.safe_dump(config))
        return target

    def env(
        self,
        kubeconfig: str | os.PathLike[str],
        cache_dir: str | os.PathLike[str] | None = None,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """An environment for subprocesses (kubectl, ``ftctl operator``): KUBECONFIG and a private cache."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(kubeconfig)
        # kubectl caches discovery per host:port; a private dir keeps runs (and ports) from seeing stale data.
        env["KUBECACHEDIR"] = str(cache_dir or pathlib.Path(kubeconfig).parent / "kube-cache")
        return env


__all__ = ["DEFAULT_NAMESPACES", "EXTRA_RESOURCES", "ApiError", "EmulatorServer", "make_emulator"]
