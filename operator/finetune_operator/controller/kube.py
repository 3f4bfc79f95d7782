"""The operator's asynchronous Kubernetes client: get, create, patch, delete of any kind we own, as JSON.

One client stack: kopf's. The operator authenticates with kopf's own login functions (the in-cluster
ServiceAccount, then the kubeconfig; :func:`login`), and the same credentials serve kopf's watches (the
``@kopf.on.login`` handler in :mod:`~finetune_operator.controller.handlers`) and this client, which sends plain
JSON over an aiohttp session (aiohttp is kopf's HTTP library) built from the public
:class:`kopf.ConnectionInfo` (``as_ssl_context()``, ``as_http_headers()``).

Why not a generated Kubernetes client: the reconciler handles five kinds in three API groups generically
(rendered dicts in, dicts out), so typed models would round-trip every object through generated classes, and
``kubernetes_asyncio``'s REST client sends every request through aiohttp with ``trust_env`` on (a proxy and a
``~/.netrc`` lookup in a thread per request). Its kubeconfig loader is still what handles a kubeconfig whose
user needs an exec or auth-provider plugin (cloud CLIs), through kopf's ``login_via_async_client``.

Memory: kopf imports every Kubernetes client library it finds installed (~40 MB for ``kubernetes_asyncio``,
whose generated models all load at import; 7 MB more for the sync client). The sync client is therefore no
dependency any more; ``bench/README.md`` measures an operator environment without either.

Errors (a small hierarchy, so callers branch on meaning rather than status codes)::

    ApiError                  any other non-2xx answer; ``.status``, ``.reason``, ``.message``
    ├── NotFound              404
    ├── AlreadyExists         409 on create
    ├── Conflict              409 on update: stale resourceVersion (optimistic concurrency)
    └── Unavailable           429/5xx/connection failures left after retries

429, 5xx and connection errors are retried here with exponential backoff (honouring ``Retry-After``), the
way client-go does, and counted in the ``api_retries`` metric. A retried create may have been stored by the
first try (a lost response): the reconciler treats the resulting AlreadyExists as success after checking the
object is its own, so retrying is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.util
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, Protocol
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from finetune_operator.controller.children import PLURALS

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A Kubernetes API error answer."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}".strip())


class NotFound(ApiError):
    """404: the object (or its kind) does not exist."""


class AlreadyExists(ApiError):
    """409 on create: an object with that name exists."""


class Conflict(ApiError):
    """409 on a write with a stale ``resourceVersion``: re-read and recompute."""


class Unavailable(ApiError):
    """429/5xx or a connection failure that persisted through the retries."""


class Kube(Protocol):
    """What the reconciler needs from the API (a fake implements it in unit tests)."""

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]: ...

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The objects of ``kind`` in ``namespace`` matching ``label_selector`` (uncached)."""
        ...

    async def post_raw(self, path: str, body: Mapping[str, Any], *, timeout: float) -> tuple[int, bytes]:
        """One POST of JSON to ``path`` (the Service proxy), without retries; (HTTP status, body).

        Any answer is returned as it is (a proxied server's 503 is a result, not an outage to retry);
        a connection failure or ``timeout`` raises :class:`Unavailable`.
        """
        ...


#: Kinds the operator only reads (never creates): the evaluation and publish Jobs' pods, whose termination
#: messages carry the workers' results (see :mod:`finetune_operator.controller.results`).
READ_ONLY_PLURALS: Final[dict[tuple[str, str], str]] = {("v1", "Pod"): "pods"}


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """``/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]`` (or ``/api/v1/...`` for the core group)."""
    plural = PLURALS.get((api_version, kind)) or READ_ONLY_PLURALS.get((api_version, kind))
    if plural is None:
        raise ValueError(f"unknown kind {api_version}/{kind}")
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{quote(namespace, safe='')}/{plural}"
    return f"{path}/{quote(name, safe='')}" if name else path


def _parse_error(status: int, body: bytes, *, verb: str) -> ApiError:
    reason, message = "", body[:500].decode(errors="replace")
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            reason = str(data.get("reason") or "")
            message = str(data.get("message") or message)
    except ValueError:
        pass
    if status == 404:
        return NotFound(status, reason or "NotFound", message)
    if status == 409:
        if verb == "POST" or reason == "AlreadyExists":
            return AlreadyExists(status, reason or "AlreadyExists", message)
        return Conflict(status, reason or "Conflict", message)
    if status == 429 or status >= 500:
        return Unavailable(status, reason, message)
    return ApiError(status, reason, message)


RequestFn = Callable[[str, str, Mapping[str, str], bytes | None], Awaitable[tuple[int, dict[str, str], bytes]]]


class RestKube:
    """:class:`Kube` over HTTP. ``request`` sends one request; retries and error mapping happen here."""

    def __init__(
        self,
        request: RequestFn,
        *,
        max_attempts: int = 8,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        on_request: Callable[[str, int], None] | None = None,
        on_retry: Callable[[str, int], None] | None = None,
    ) -> None:
        self._request = request
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._on_request = on_request
        self._on_retry = on_retry

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call with retries on 429/5xx/connection errors; the decoded JSON answer."""
        url = f"{path}?{urlencode(dict(query))}" if query else path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "Content-Type": content_type}
        delay = self.backoff
        for attempt in range(1, self.max_attempts + 1):
            try:
                status, resp_headers, payload = await self._request(method, url, headers, data)
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                err: ApiError = Unavailable(0, type(exc).__name__, str(exc))
                retry_after = None
            else:
                if self._on_request is not None:
                    self._on_request(method, status)
                if 200 <= status < 300:
                    return json.loads(payload) if payload else {}
                err = _parse_error(status, payload, verb=method)
                retry_after = resp_headers.get("Retry-After") or resp_headers.get("retry-after")
            if not isinstance(err, Unavailable) or attempt == self.max_attempts:
                raise err
            if self._on_retry is not None:
                self._on_retry(method, err.status)
            wait = delay * (0.5 + random.random())
            if retry_after:
                with contextlib.suppress(ValueError):
                    wait = max(wait, min(float(retry_after), self.max_backoff))
            log.debug("%s %s: %s; retry %d in %.2fs", method, path, err, attempt, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.call("GET", resource_path(api_version, kind, namespace, name))
        except NotFound:
            return None
        result.setdefault("apiVersion", api_version)
        result.setdefault("kind", kind)
        return result

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace") or "default")
        result: dict[str, Any] = await self.call("POST", path, body=obj)
        return result

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = resource_path(api_version, kind, namespace, name)
        if subresource:
            path = f"{path}/{subresource}"
        result: dict[str, Any] = await self.call("PATCH", path, body=patch, content_type=MERGE_PATCH)
        return result

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete with background propagation: the object goes now, its pods are collected after."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        with contextlib.suppress(NotFound):
            await self.call("DELETE", resource_path(api_version, kind, namespace, name), body=body)

    async def post_raw(self, path: str, body: Mapping[str, Any], *, timeout: float) -> tuple[int, bytes]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            async with asyncio.timeout(timeout):
                status, _, payload = await self._request("POST", path, headers, json.dumps(body).encode())
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            raise Unavailable(0, type(exc).__name__, str(exc) or f"no answer within {timeout:g}s") from None
        if self._on_request is not None:
            self._on_request("POST", status)
        return status, payload

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        result = await self.call(
            "GET", resource_path(api_version, kind, namespace), query={"labelSelector": label_selector}
        )
        items = result.get("items") if isinstance(result, dict) else None
        return [dict(x) for x in items or [] if isinstance(x, dict)]


#: kubeconfig users that kopf's minimal kubeconfig login cannot turn into credentials by itself.
PLUGIN_USER_KEYS = ("exec", "auth-provider")


def _has_credentials(info: kopf.ConnectionInfo) -> bool:
    return bool(info.token or info.username or info.certificate_path or info.certificate_data or info.scheme)


async def login(
    *, settings: kopf.OperatorSettings | None = None, logger: Any = None, in_cluster: bool = True
) -> kopf.ConnectionInfo:
    """The operator's credentials, like ``kubectl`` finds them: the in-cluster ServiceAccount first, then the
    kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``, its current context).

    Both come from kopf's public login functions. A kubeconfig user with an exec or auth-provider plugin yields
    no credentials there; those are obtained through ``kubernetes_asyncio``'s loader (kopf's
    ``login_via_async_client``) when that package is installed (it is a dependency; an environment without it
    gets a warning instead).
    Called again on a 401 (projected ServiceAccount tokens rotate; plugin tokens expire). ``in_cluster=False``
    (``ftctl operator --kubeconfig``) skips the ServiceAccount.
    """
    settings = settings if settings is not None else kopf.OperatorSettings()
    logger = logger if logger is not None else log
    info = kopf.login_with_service_account(settings=settings, logger=logger) if in_cluster else None
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings, logger=logger)
        if info is not None and not _has_credentials(info):
            if importlib.util.find_spec("kubernetes_asyncio") is None:
                log.warning(
                    "the kubeconfig user has no token or certificate; exec/auth-provider plugins need "
                    "kubernetes_asyncio installed: continuing without credentials"
                )
            else:
                info = await kopf.login_via_async_client(settings=settings, logger=logger) or info
    if info is None:
        raise kopf.LoginError("no credentials: not in a cluster (no ServiceAccount token) and no kubeconfig")
    return info


def _session(info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
    # trust_env only when the operator's settings ask for it (kopf's ``networking.trust_env``): with it, aiohttp
    # looks up proxy variables and ~/.netrc in a thread for every single request.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
        timeout=aiohttp.ClientTimeout(total=60),
        headers={"User-Agent": "finetune-operator"},
    )


class _Connection:
    """The current credentials and their session; replaced (not mutated) after a 401."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self.info = info
        self.session = _session(info)
        self.server = info.server.rstrip("/")
        self.auth = info.as_http_headers()

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = {**headers, **self.auth}
        async with self.session.request(method, self.server + url, headers=hdrs, data=body) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def connect(
    *, settings: kopf.OperatorSettings | None = None, in_cluster: bool = True
) -> tuple[RequestFn, Callable[[], Awaitable[None]]]:
    """A request function authenticated by :func:`login`, and its closer.

    On a 401 the credentials are obtained again (once for all requests that failed with the same ones: a
    rotated token file, an expired plugin token) and the request is sent once more with them. Sessions of
    replaced credentials are closed with the client (requests may still be running on them).
    """
    current = _Connection(await login(settings=settings, in_cluster=in_cluster))
    replaced: list[_Connection] = []
    relogin = asyncio.Lock()

    async def request(
        method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        nonlocal current
        used = current
        answer = await used.send(method, url, headers, body)
        if answer[0] != 401:
            return answer
        async with relogin:
            if current is used:  # nobody has refreshed them meanwhile
                log.info("401 from the API server: logging in again")
                replaced.append(current)
                current = _Connection(await login(settings=settings, in_cluster=in_cluster))
        return await current.send(method, url, headers, body)

    async def close() -> None:
        for conn in (*replaced, current):
            await conn.session.close()

    return request, close


_FRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("finetune_fresh_reads", default=False)


@contextlib.contextmanager
def fresh_reads() -> Iterator[None]:
    """Within this block, :class:`CachingKube` reads bypass the cache (drift checks, conflict recovery)."""
    token = _FRESH.set(True)
    try:
        yield
    finally:
        _FRESH.reset(token)


class CachingKube:
    """:class:`Kube` with an informer-style cache: objects from watch events and from our own writes.

    Why: with a plain GET of the FineTuneJob and its workload on every reconcile, reads were a third of the
    operator's API traffic, all for objects whose latest state had just arrived on a watch. Serving them from
    memory is safe here because every *write* is guarded by the server: status and annotation writes carry
    the resourceVersion they were computed from (a stale read ends in a 409, after which the entry is dropped
    and the reconcile re-reads), and creates of deterministic names cannot duplicate. A missing entry is never
    taken as "absent": it is read from the server. ConfigMaps and Events are not cached (large, not watched).

    Memory: entries are kept as compact JSON (a parsed FineTuneJob is ~10x its JSON size in Python objects),
    children without their pod templates (the reconciler reads their metadata, status and suspend/replicas
    fields only), and without ``managedFields`` and kubectl's last-applied annotation.
    """

    UNCACHED = frozenset({"ConfigMap", "Event"})
    #: The spec fields of children the reconciler reads (suspend switches, replicas).
    CHILD_SPEC_FIELDS = frozenset({"suspend", "runPolicy", "runMode", "replicas"})
    LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

    def __init__(self, inner: Kube) -> None:
        self.inner = inner
        self._objects: dict[tuple[str, str, str], tuple[str, str, bytes]] = {}  # key -> (uid, rv, json)

    # ------------------------------------------------------------------ cache maintenance

    @staticmethod
    def _key(kind: str, namespace: str, name: str) -> tuple[str, str, str]:
        return (kind, namespace, name)

    def observe(self, type_: str | None, obj: Mapping[str, Any]) -> None:
        """Feed a watch event (``DELETED`` removes the entry, if it is the same object)."""
        kind = str(obj.get("kind") or "")
        if not kind or kind in self.UNCACHED:
            return
        meta = obj.get("metadata") or {}
        key = self._key(kind, str(meta.get("namespace") or "default"), str(meta.get("name")))
        if type_ == "DELETED":
            current = self._objects.get(key)
            if current is not None and current[0] == meta.get("uid"):
                del self._objects[key]
            return
        self._put(key, obj)

    def _slim(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(obj)
        meta = dict(out.get("metadata") or {})
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if annotations and self.LAST_APPLIED in annotations:
            meta["annotations"] = {k: v for k, v in annotations.items() if k != self.LAST_APPLIED}
        out["metadata"] = meta
        if out.get("kind") != "FineTuneJob" and isinstance(out.get("spec"), Mapping):
            out["spec"] = {k: v for k, v in out["spec"].items() if k in self.CHILD_SPEC_FIELDS}
        return out

    def _put(self, key: tuple[str, str, str], obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid, rv = str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")
        current = self._objects.get(key)
        if current is not None and current[0] == uid and rv and current[1] == rv:
            return  # the watch's echo of our own write: the same object, already stored
        stale = current is not None and current[0] == uid and rv.isdigit() and current[1].isdigit()
        if stale and current is not None and int(rv) < int(current[1]):
            return  # a late watch event older than what our own write returned
        self._objects[key] = (uid, rv, json.dumps(self._slim(obj), separators=(",", ":")).encode())

    def drop(self, kind: str, namespace: str, name: str) -> None:
        self._objects.pop(self._key(kind, namespace, name), None)

    def forget_namespace_prefix(self, namespace: str, prefix: str) -> None:
        """Drop every entry of a deleted FineTuneJob (its children's names start with its name)."""
        for key in [k for k in self._objects if k[1] == namespace and k[2].startswith(prefix)]:
            del self._objects[key]

    def __len__(self) -> int:
        return len(self._objects)

    def peek(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The cached object, without asking the server (None when not cached): what the watch last said."""
        entry = self._objects.get(self._key(kind, namespace, name))
        if entry is None:
            return None
        cached: dict[str, Any] = json.loads(entry[2])
        return cached

    # ------------------------------------------------------------------ Kube

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = self._key(kind, namespace, name)
        if not _FRESH.get() and key in self._objects:
            cached: dict[str, Any] = json.loads(self._objects[key][2])
            return cached
        found = await self.inner.get(api_version, kind, namespace, name)
        if found is None:
            self._objects.pop(key, None)
        elif kind not in self.UNCACHED:
            self._put(key, found)
        return found

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        created = await self.inner.create(obj)
        created.setdefault("apiVersion", obj["apiVersion"])
        created.setdefault("kind", obj["kind"])
        if obj["kind"] not in self.UNCACHED:
            meta = created.get("metadata") or {}
            self._put(self._key(obj["kind"], str(meta.get("namespace") or "default"), str(meta.get("name"))), created)
        return created

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        try:
            updated = await self.inner.patch(api_version, kind, namespace, name, patch, subresource=subresource)
        except ApiError:
            self.drop(kind, namespace, name)
            raise
        updated.setdefault("apiVersion", api_version)
        updated.setdefault("kind", kind)
        if kind not in self.UNCACHED:
            self._put(self._key(kind, namespace, name), updated)
        return updated

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.drop(kind, namespace, name)
        await self.inner.delete(api_version, kind, namespace, name)

    async def post_raw(self, path: str, body: Mapping[str, Any], *, timeout: float) -> tuple[int, bytes]:
        """Not cached: the Service proxy (the answer check)."""
        return await self.inner.post_raw(path, body, timeout=timeout)

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Not cached: only pods are listed, rarely (once per finished evaluation/publish Job)."""
        return await self.inner.list(api_version, kind, namespace, label_selector)
