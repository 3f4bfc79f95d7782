"""``FidelityEmulator``: kmock's ``KubernetesEmulator`` made faithful enough for kopf, kubectl and both clients.

kmock 0.8 serves the Kubernetes REST API over real HTTP, but with the gaps listed below (each one was seen
failing kopf or kubectl).  This subclass keeps kmock's HTTP server, request parsing types, resource registry
(``emulator.resources``, ``load_bundled()``) and its reaction DSL (``emulator[...] << 409``), and replaces the
object store and the request handling with an implementation of the API semantics our tests rely on:

=============================================  =================================================================
kmock 0.8 gap                                  what this layer does
=============================================  =================================================================
``GET /api/v1/namespaces`` → 500 (parser)      own path parser; namespaces are an ordinary cluster resource
no resourceVersion/uid/creationTimestamp/      all set by the server; resourceVersion is one global monotonic
generation                                     counter; generation bumps on spec changes only (see below)
URL namespace not copied into the object       ``metadata.namespace`` comes from the URL (400 on a mismatch)
create answers 200                             201 Created; 409 AlreadyExists for an existing name
no PUT, no conflicts                           PUT replaces; stale ``metadata.resourceVersion`` → 409 Conflict
                                               on PUT and on any PATCH that carries one
JSON-patch ``test`` failure → 500              422, as kube-apiserver (kopf relies on it)
``/status`` patches the whole object           status subresource split (both directions)
selectors ignored                              label selectors (=, ==, !=, in, notin, exists, !exists) and
                                               field selectors (metadata.name/namespace, a few more)
watch replays everything, ignores timeouts     watch from ``resourceVersion`` (only newer events; 410 Expired
                                               when too old), ``timeoutSeconds``, ADDED/MODIFIED/DELETED with
                                               selector transitions, ``sendInitialEvents`` + bookmark,
                                               ``Content-Type: application/json`` (``kubectl get -w`` works)
POSTed CRDs are inert                          CRDs register their versions in discovery with shortNames,
                                               categories, subresources and printer columns; status
                                               ``Established``; deleting the CRD deletes its objects
no garbage collection                          ownerReference GC: background (default), foreground, orphan;
                                               cascading; namespace deletion empties the namespace
finalizers                                     deletionTimestamp while finalizers remain; gone when emptied;
                                               no new finalizers on a deleting object (422)
no Table                                       ``as=Table`` responses from printer columns (kubectl get)
every patch is a dict-merge                    merge, strategic (as merge), JSON-patch, apply-patch (as merge)
history of every request re-filtered on        kmock's request history is kept only while DSL reactions are
every request (throughput collapses)           installed; our own compact ``request_log`` is always kept
=============================================  =================================================================

Not emulated (documented in README.md): schema validation/defaulting/pruning of custom resources, CEL rules,
admission webhooks, authentication/authorisation (any token is accepted), server-side-apply field ownership,
strategic-merge list merging, pagination (``limit`` is ignored), protobuf, ``/openapi`` (use
``kubectl apply --validate=false``), controllers of built-in kinds (no Pods from Jobs, no Deployment status).

Threading model: the server runs on one asyncio loop (see ``runner.EmulatorServer``); every mutation happens
on that loop under ``state_lock`` (a ``threading.RLock``) and notifies ``changed`` (a ``threading.Condition``
on the same lock), so tests in other threads read consistent snapshots and wait for conditions without
polling.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import json
import re
import secrets
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import rendering

from . import errors, patching, proxy, selectors, tables
from .errors import ApiError

ALL_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
SUBRESOURCE_VERBS = ["get", "patch", "update"]
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")
SERVER_VERSION = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0-finetune-emulator",
    "gitCommit": "emulated",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}
#: Resources whose names are DNS-1123 *labels* (<= 63 chars) rather than subdomains (<= 253).
LABEL_NAMED = {("", "namespaces"), ("", "services")}
#: Jobs put their name into a label value (batch.kubernetes.io/job-name), so the real API refuses > 63 chars.
LABEL_LENGTH_NAMED = {("batch", "jobs"), ("", "services"), ("", "namespaces")}

_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

StoreKey = tuple[str, str]  # (group, plural): storage is shared by all versions of a resource
ObjKey = tuple[str | None, str]  # (namespace, name)


class RequestRecord(NamedTuple):
    """One API request as RBAC sees it: compare these with a Role's/ClusterRole's rules."""

    verb: str
    group: str
    version: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None


class RequestMeta(NamedTuple):
    """Who sent a logged request and what it got (parallel to ``request_log``)."""

    user_agent: str
    code: int


class Route(NamedTuple):
    """A parsed request path: discovery levels or a resource request."""

    kind: str  # 'resource' | 'api' | 'apis' | 'group' | 'version' | 'other'
    group: str = ""
    version: str = ""
    plural: str = ""
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_route(path: str) -> Route:
    """Parse a REST path; unlike kmock, ``/api/v1/namespaces[/name[/status]]`` is the namespaces resource."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return Route("other")
    if parts[0] == "api":
        if len(parts) == 1:
            return Route("api")
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) == 1:
            return Route("apis")
        if len(parts) == 2:
            return Route("group", group=parts[1])
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        return Route("version", group=group, version=version)
    namespace = None
    is_namespace_subresource = group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")
    if rest[0] == "namespaces" and len(rest) >= 3 and not is_namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return Route("resource", group, version, plural, namespace, name, subresource)


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > anything else."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (0, 0, 0)
    stability = {None: 3, "beta": 2, "alpha": 1}[m.group(2)]
    return (stability, int(m.group(1)), int(m.group(3) or 0))


@attrs.define(eq=False)
class Watcher:
    """One open watch stream: its filters and the queue its events go to."""

    key: StoreKey
    version: str
    namespace: str | None
    label_match: selectors.Predicate
    field_match: selectors.Predicate
    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = attrs.field(factory=asyncio.Queue)

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj.get("metadata", {}).get("namespace") != self.namespace:
            return False
        return self.label_match(obj) and self.field_match(obj)

    def translate(self, etype: str, obj: dict[str, Any], old: dict[str, Any] | None) -> str | None:
        """The event type this watcher sees: selector transitions turn MODIFIED into ADDED/DELETED."""
        if etype == "MODIFIED":
            was, now = self.matches(old), self.matches(obj)
            return "MODIFIED" if was and now else "ADDED" if now else "DELETED" if was else None
        return etype if self.matches(obj) else None

    def offer(self, etype: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        seen = self.translate(etype, obj, old)
        if seen is not None:
            self.queue.put_nowait((seen, obj))

    def close(self) -> None:
        self.queue.put_nowait(None)


@attrs.define(eq=False)
class Fault:
    """An injected failure: the next ``count`` matching requests answer ``status``.

    ``lost=False`` rejects the request before anything is stored (a true rejection: the object is unchanged);
    ``lost=True`` stores the write and then answers the error (the client never learns it succeeded).
    """

    verbs: frozenset[str]
    resource: str | None
    status: int
    count: int | None
    lost: bool = False
    name: str | None = None
    namespace: str | None = None
    subresource: str | None = "*"
    retry_after: int = 1
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.hits >= self.count

    def matches(self, rec: RequestRecord) -> bool:
        if self.exhausted or rec.verb not in self.verbs:
            return False
        if self.resource is not None and self.resource not in (
            rec.resource,
            f"{rec.resource}.{rec.group}",
            f"{rec.group}/{rec.version}/{rec.resource}",
            f"{rec.version}/{rec.resource}" if not rec.group else f"{rec.group}/{rec.resource}",
        ):
            return False
        if self.subresource != "*" and self.subresource != rec.subresource:
            return False
        if self.name is not None and self.name != rec.name:
            return False
        return self.namespace is None or self.namespace == rec.namespace

    def error(self, verb: str, plural: str, group: str, name: str | None) -> ApiError:
        if self.status == 409:
            if verb == "create":
                return errors.already_exists(plural, group, name or "")
            return errors.conflict(plural, group, name or "")
        if self.status == 429:
            return errors.too_many_requests(self.retry_after)
        if self.status == 404:
            return errors.not_found(plural, group, name or "")
        if self.status == 410:
            return errors.gone("too old resource version (injected)")
        if self.status >= 500:
            return ApiError(self.status, "InternalError", "Internal error occurred: injected fault")
        return ApiError(self.status, "InjectedFault", f"injected fault {self.status}")


@attrs.define(kw_only=True)
class FidelityEmulator(kmock.KubernetesEmulator):
    """A ``kmock.KubernetesEmulator`` with the API-server semantics of the module docstring."""

    #: Watch events kept for ``watch?resourceVersion=N``; older resourceVersions answer 410 Expired.
    history_limit: int = 50_000
    #: Keep kmock's full request history even without DSL reactions (slow after a few hundred requests).
    record_history: bool = False
    #: Refuse namespaced objects in namespaces that do not exist (404), like the real server.
    strict_namespaces: bool = True

    request_log: list[RequestRecord] = attrs.field(factory=list, init=False)
    request_log_meta: list[RequestMeta] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    #: Callables ``hook(record, body)`` run (on the server loop) before each resource request is served; one
    #: may raise ``ApiError`` to reject the request before anything is stored, or record/trigger test events
    #: (e.g. stop the operator after its N-th write). They must not block.
    hooks: list[Callable[[RequestRecord, Any], None]] = attrs.field(factory=list, init=False)
    #: Where a Service's port answers, for the Service proxy (the test plays kube-proxy): ``(namespace, name,
    #: port) -> 'http://127.0.0.1:N'`` (see :mod:`tests.emulator.proxy`).
    service_backends: dict[tuple[str, str, str], str] = attrs.field(factory=dict, init=False)
    #: RBAC enforcement for the tokens it knows (:class:`tests.emulator.rbac.Authorizer`); None: allow all.
    authorizer: Any = attrs.field(default=None, init=False)
    state_lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    changed: threading.Condition = attrs.field(init=False)
    loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)

    _store: dict[StoreKey, dict[ObjKey, dict[str, Any]]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _rv: int = attrs.field(default=1000, init=False)
    _history: collections.deque[tuple[int, StoreKey, str, dict[str, Any], dict[str, Any] | None]] = attrs.field(
        init=False
    )
    _history_floor: int = attrs.field(default=1000, init=False)
    _watchers: dict[StoreKey, set[Watcher]] = attrs.field(factory=lambda: collections.defaultdict(set), init=False)
    _printer_columns: dict[tuple[str, str, str], list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _crd_resources: dict[str, set[kmock.resource]] = attrs.field(factory=dict, init=False)
    _custom_keys: set[StoreKey] = attrs.field(factory=set, init=False)
    _loop_thread: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        # Deliberately NOT calling kmock's post-init: its catch-all fallback reactions are what re-filters the
        # whole request history on every request; we serve everything from _serve() instead.
        self.changed = threading.Condition(self.state_lock)
        self._history = collections.deque(maxlen=self.history_limit)

    async def __aenter__(self) -> FidelityEmulator:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await super().__aenter__()
        return self

    # ------------------------------------------------------------------ registry

    def register(
        self,
        resource: str,
        kind: str,
        *,
        namespaced: bool = True,
        status: bool = True,
        shortnames: Iterable[str] = (),
        categories: Iterable[str] = (),
        printer_columns: list[dict[str, Any]] | None = None,
        scale: bool = False,
    ) -> kmock.resource:
        """Declare a resource (``'group/version/plural'``) as a CRD would, without a CRD object."""
        res = kmock.resource(resource)
        assert res.group is not None and res.version is not None and res.plural is not None, resource
        subresources = ({"status"} if status else set()) | ({"scale"} if scale else set())
        self.resources[res] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            verbs=ALL_VERBS,
            shortnames=set(shortnames),
            categories=set(categories),
            subresources=subresources,
        )
        self._custom_keys.add((res.group, res.plural))
        if printer_columns is not None:
            self._printer_columns[(res.group, res.version, res.plural)] = printer_columns
        return res

    def declared(self) -> list[kmock.resource]:
        """The declared resources (kmock types its keys loosely; they are always parsed ``resource``s)."""
        return [res for res in self.resources if isinstance(res, kmock.resource)]

    def info(self, group: str, version: str, plural: str) -> kmock.ResourceInfo | None:
        res = kmock.resource(group, version, plural)
        # Not .get(): kmock's ResourcesArray.__getitem__ auto-creates missing entries.
        return self.resources[res] if res in self.resources else None  # noqa: SIM401

    def resolve(self, ref: str) -> tuple[str, str, str]:
        """Resolve ``plural``, ``kind``, short name, ``plural.group`` or ``group/version/plural``."""
        candidates: list[tuple[str, str, str]] = []
        for res in self.declared():
            info = self.resources[res]
            group, version, plural = res.group or "", res.version or "", res.plural or ""
            names = {
                plural,
                f"{plural}.{group}",
                f"{group}/{version}/{plural}",
                f"{version}/{plural}" if not group else "",
                (info.kind or "").lower(),
                *info.shortnames,
            }
            if ref.lower() in names or ref == info.kind:
                candidates.append((group, version, plural))
        if not candidates:
            raise KeyError(f"unknown resource {ref!r}")
        # Prefer the core group, then the highest version priority (as kubectl's RESTMapper would).
        candidates.sort(key=lambda c: (c[0] != "", tuple(-x for x in version_priority(c[1]))))
        return candidates[0]

    def resolve_kind(self, api_version: str, kind: str) -> tuple[str, str, str]:
        group, _, version = api_version.rpartition("/")
        for res in self.declared():
            if res.group == group and res.version == version and self.resources[res].kind == kind:
                return group, version, res.plural or ""
        raise KeyError(f"no resource for {api_version} {kind}")

    def has_status_subresource(self, group: str, plural: str) -> bool:
        return any(
            res.group == group and res.plural == plural and "status" in self.resources[res].subresources
            for res in self.declared()
        )

    # ------------------------------------------------------------------ store access (any thread)

    def objects_of(self, group: str, plural: str) -> list[dict[str, Any]]:
        with self.state_lock:
            return [copy.deepcopy(obj) for obj in self._store[(group, plural)].values()]

    def find(self, group: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self.state_lock:
            obj = self._store[(group, plural)].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    @property
    def resource_version(self) -> int:
        return self._rv

    def iter_all(self) -> Iterator[tuple[StoreKey, dict[str, Any]]]:
        with self.state_lock:
            items = [(key, obj) for key, objs in self._store.items() for obj in objs.values()]
        yield from items

    # ------------------------------------------------------------------ faults

    def fail(
        self,
        verbs: str | Iterable[str],
        resource: str | None = None,
        *,
        status: int = 500,
        count: int | None = 1,
        lost: bool = False,
        name: str | None = None,
        namespace: str | None = None,
        subresource: str | None = "*",
        retry_after: int = 1,
    ) -> Fault:
        """Make the next ``count`` matching requests fail (see :class:`Fault`); returns the rule."""
        fault = Fault(
            frozenset([verbs] if isinstance(verbs, str) else verbs),
            resource,
            status,
            count,
            lost,
            name,
            namespace,
            subresource,
            retry_after,
        )
        with self.state_lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state_lock:
            self.faults.clear()

    def watch_count(self, resource: str | None = None) -> int:
        """How many watch streams are open (all, or of one resource: plural or plural.group)."""
        with self.state_lock:
            return sum(
                len(watchers)
                for (group, plural), watchers in self._watchers.items()
                if resource is None or resource in (plural, f"{plural}.{group}")
            )

    def drop_watches(self, resource: str | None = None) -> int:
        """End open watch streams (all, or of one resource) as a load-balancer reset would (any thread)."""
        dropped = 0
        with self.state_lock:
            for (group, plural), watchers in self._watchers.items():
                if resource is not None and resource not in (plural, f"{plural}.{group}"):
                    continue
                for watcher in list(watchers):
                    if self.loop is None or threading.get_ident() == self._loop_thread:
                        watcher.close()
                    else:
                        self.loop.call_soon_threadsafe(watcher.close)
                    dropped += 1
        return dropped

    def _take_fault(self, rec: RequestRecord, lost: bool) -> Fault | None:
        with self.state_lock:
            for fault in self.faults:
                if fault.lost == lost and fault.matches(rec):
                    fault.hits += 1
                    return fault
        return None

    # ------------------------------------------------------------------ request log

    def dump_request_log(self, path: str | None = None, user_agent: str | None = None) -> str:
        """The request log as JSON (optionally only requests whose User-Agent starts with ``user_agent``)."""
        rows = [
            dict(rec._asdict(), userAgent=meta.user_agent, code=meta.code)
            for rec, meta in zip(self.request_log, self.request_log_meta, strict=False)
            if user_agent is None or meta.user_agent.startswith(user_agent)
        ]
        text = json.dumps(rows, indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def clear_request_log(self) -> None:
        self.request_log.clear()
        self.request_log_meta.clear()

    # ------------------------------------------------------------------ HTTP entry point

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        if (proxied := proxy.match(raw.path)) is not None:
            return await self._serve_service_proxy(raw, proxied, body)
        route = parse_route(raw.path)
        query = dict(raw.query)
        verb = self._verb(raw.method, route, query)
        rec = (
            RequestRecord(
                verb, route.group, route.version, route.plural, route.subresource, route.namespace, route.name
            )
            if route.kind == "resource"
            else None
        )
        meta_index = None
        if rec is not None:
            self.request_log.append(rec)
            self.request_log_meta.append(RequestMeta(raw.headers.get("User-Agent", ""), 0))
            meta_index = len(self.request_log_meta) - 1
        try:
            response = await self._dispatch(raw, route, verb, query, body, rec)
        except ApiError as e:
            response = aiohttp.web.json_response(e.status(), status=e.code, headers=e.headers)
        except rendering.StreamingError as e:  # a DSL stream failed after its headers were sent
            response = e.args[0]
        except Exception as e:  # a bug here must reach the client as a 500 Status, not a dropped connection
            if self._errors:
                self._errors[-1].append(e)
            status = ApiError(500, "InternalError", f"emulator error: {e!r}", {"traceback": traceback.format_exc()})
            response = aiohttp.web.json_response(status.status(), status=500)
        if meta_index is not None:
            self.request_log_meta[meta_index] = self.request_log_meta[meta_index]._replace(code=response.status)
        return response

    async def _serve_service_proxy(
        self, raw: aiohttp.web.BaseRequest, m: re.Match[str], body: bytes
    ) -> aiohttp.web.StreamResponse:
        """``services/NAME[:PORT]/proxy/...``: see :mod:`tests.emulator.proxy` (the test plays the endpoints)."""
        name = m["svc"].partition(":")[0]
        rec = RequestRecord(proxy.proxy_verb(raw.method), "", "v1", "services", "proxy", m["ns"], name)
        self.request_log.append(rec)
        self.request_log_meta.append(RequestMeta(raw.headers.get("User-Agent", ""), 0))
        index = len(self.request_log_meta) - 1
        try:
            if self.authorizer is not None:  # authorised like any request: create on services/proxy for a POST
                denied = self.authorizer.check(raw.headers.get("Authorization"), rec)
                if denied is not None:
                    raise denied
            service = self.find("", "services", m["ns"], name)
            response = await proxy.forward(raw, m, service, self.service_backends, body)
        except ApiError as e:
            response = aiohttp.web.json_response(e.status(), status=e.code, headers=e.headers)
        self.request_log_meta[index] = self.request_log_meta[index]._replace(code=response.status)
        return response

    @staticmethod
    def _verb(method: str, route: Route, query: Mapping[str, str]) -> str:
        if method == "GET":
            if query.get("watch") in ("true", "1"):
                return "watch"
            return "get" if route.name else "list"
        return {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if route.name else "deletecollection",
        }.get(method, method.lower())

    def _kmock_request(
        self, raw: aiohttp.web.BaseRequest, route: Route, verb: str, data: Any, body: bytes
    ) -> rendering.Request:
        action = {
            "get": kmock.action.FETCH,
            "list": kmock.action.LIST,
            "watch": kmock.action.WATCH,
            "create": kmock.action.CREATE,
            "update": kmock.action.UPDATE,
            "patch": kmock.action.UPDATE,
            "delete": kmock.action.DELETE,
            "deletecollection": kmock.action.DELETE,
        }.get(verb)
        resource = kmock.resource(route.group, route.version, route.plural) if route.kind == "resource" else None
        request = rendering.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=dict(raw.query),
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            data=data,
            body=body,
            text=body.decode("utf-8", "replace"),
            action=action,
            resource=resource,
            namespace=route.namespace,
            name=route.name,
            subresource=route.subresource,
        )
        if self._payloads or self.record_history:
            self._requests.append(request)
        return request

    async def _react(self, request: rendering.Request) -> aiohttp.web.StreamResponse | None:
        """Serve the request from user DSL reactions (fault injection), if any matches (as kmock does)."""
        payloads = sorted(self._payloads, key=lambda p: tuple(-x for x in p.priorities))
        for payload in payloads:
            if request in payload._source and not payload._disabled.is_set():
                try:
                    return await payload(request)
                except rendering.ReactionMismatchError:
                    payload._disabled.set()
                except NotImplementedError:
                    pass
        return None

    async def _dispatch(
        self,
        raw: aiohttp.web.BaseRequest,
        route: Route,
        verb: str,
        query: dict[str, str],
        body: bytes,
        rec: RequestRecord | None,
    ) -> aiohttp.web.StreamResponse:
        data = self._decode(raw, body)
        request = self._kmock_request(raw, route, verb, data, body)
        if rec is not None and self.authorizer is not None:
            denied = self.authorizer.check(raw.headers.get("Authorization"), rec)
            if denied is not None:
                raise denied
        if rec is not None:
            for hook in list(self.hooks):
                hook(rec, data)
        if rec is not None and (fault := self._take_fault(rec, lost=False)):
            raise fault.error(verb, route.plural, route.group, route.name or _name_of(data))
        is_write = verb in ("create", "update", "patch", "delete", "deletecollection")
        if self._payloads and not is_write:
            reacted = await self._react(request)
            if reacted is not None:
                return reacted
        if route.kind != "resource":
            return self._serve_discovery(raw, route)
        if verb == "watch":
            return await self._serve_watch_stream(raw, route, query)
        payload, code = self._serve_resource(raw, route, verb, query, data)
        if rec is not None and (fault := self._take_fault(rec, lost=True)):
            raise fault.error(verb, route.plural, route.group, route.name or _name_of(data))
        if self._payloads and is_write:
            reacted = await self._react(request)  # stored first: an injected error is a lost response
            if reacted is not None:
                return reacted
        return aiohttp.web.json_response(payload, status=code)

    @staticmethod
    def _decode(raw: aiohttp.web.BaseRequest, body: bytes) -> Any:
        if not body:
            return None
        content_type = raw.headers.get("Content-Type", "application/json")
        if "protobuf" in content_type or "cbor" in content_type:
            # kubectl's typed generators (`kubectl create configmap ...`) send protobuf; not emulated.
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the emulator accepts JSON and YAML bodies only, not "
                f"{content_type}; use `kubectl create -f`/`apply -f` with a manifest instead",
            )
        try:
            if "yaml" in content_type:
                return yaml.safe_load(body)
            return json.loads(body)
        except (ValueError, yaml.YAMLError) as e:
            raise errors.bad_request(f"unable to decode the request body: {e}") from None

    # ------------------------------------------------------------------ discovery

    def _serve_discovery(self, raw: aiohttp.web.BaseRequest, route: Route) -> aiohttp.web.StreamResponse:
        path = raw.path.rstrip("/") or "/"
        if route.kind == "other":
            if path == "/version":
                return aiohttp.web.json_response(SERVER_VERSION)
            if path in ("/healthz", "/readyz", "/livez"):
                return aiohttp.web.Response(text="ok")
            if path == "/":
                paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
                paths += sorted({f"/apis/{r.group}" for r in self.declared() if r.group})
                return aiohttp.web.json_response({"paths": paths})
            if path == "/openapi/v3" or path.startswith("/openapi/v3/"):
                return aiohttp.web.json_response(self._openapi_v3(path))
            raise errors.resource_not_found(path)  # incl. /openapi/v2: no schemas (see README)
        if route.kind == "api":
            return aiohttp.web.json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": raw.host}],
                }
            )
        groups = self._groups()
        if route.kind == "apis":
            return aiohttp.web.json_response(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [self._group_doc(g, vs) for g, vs in sorted(groups.items()) if g],
                }
            )
        if route.kind == "group":
            if route.group not in groups:
                raise errors.resource_not_found(path)
            return aiohttp.web.json_response(
                dict(self._group_doc(route.group, groups[route.group]), kind="APIGroup", apiVersion="v1")
            )
        # route.kind == 'version'
        if route.version not in groups.get(route.group, []):
            raise errors.resource_not_found(path)
        resources = []
        for res in sorted(self.declared(), key=lambda r: r.plural or ""):
            if res.group != route.group or res.version != route.version:
                continue
            info = self.resources[res]
            kind = info.kind or (res.plural or "").capitalize()
            resources.append(
                {
                    "name": res.plural,
                    "singularName": info.singular or kind.lower(),
                    "namespaced": bool(info.namespaced),
                    "kind": kind,
                    "verbs": sorted(info.verbs or ALL_VERBS),
                    "shortNames": sorted(info.shortnames),
                    "categories": sorted(info.categories),
                }
            )
            for sub in sorted(info.subresources):
                resources.append(
                    {
                        "name": f"{res.plural}/{sub}",
                        "singularName": "",
                        "namespaced": bool(info.namespaced),
                        "kind": "Scale" if sub == "scale" else kind,
                        "verbs": SUBRESOURCE_VERBS,
                    }
                )
        group_version = f"{route.group}/{route.version}" if route.group else route.version
        return aiohttp.web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": resources,
            }
        )

    def _openapi_v3(self, path: str) -> dict[str, Any]:
        """Minimal OpenAPI v3: enough for kubectl to see that the server validates fields itself.

        kubectl's default ``--validate=strict`` first asks ``/openapi/v3`` whether the PATCH operation of a
        kind takes the ``fieldValidation`` query parameter; if it does, kubectl leaves validation to the server
        and needs no schema.  We advertise it (and ``dryRun``) for every resource but publish no schemas, so
        ``kubectl apply -f`` works without ``--validate=false``; the server does not actually reject unknown
        fields (README: no schema validation).  No ``application/strategic-merge-patch+json`` request body is
        listed, so kubectl computes client-side apply patches from its compiled-in types (built-ins) or as
        JSON merge patches (custom resources), as it does against a real server without schemas.
        """
        groups = self._groups()
        if path.rstrip("/") == "/openapi/v3":
            index = {}
            for group, versions in groups.items():
                for version in versions:
                    gv = f"apis/{group}/{version}" if group else f"api/{version}"
                    index[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self._rv}"}
            return {"paths": index}
        parts = path.rstrip("/").split("/")[3:]  # after /openapi/v3
        if parts[:1] == ["api"] and len(parts) == 2:
            group, version = "", parts[1]
        elif parts[:1] == ["apis"] and len(parts) == 3:
            group, version = parts[1], parts[2]
        else:
            raise errors.resource_not_found(path)
        if version not in groups.get(group, []):
            raise errors.resource_not_found(path)
        params = [
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
        ]
        paths: dict[str, Any] = {}
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        for res in self.declared():
            if res.group != group or res.version != version:
                continue
            info = self.resources[res]
            gvk = {"group": group, "version": version, "kind": info.kind}
            scope = "/namespaces/{namespace}" if info.namespaced else ""
            paths[f"{prefix}{scope}/{res.plural}/{{name}}"] = {
                "patch": {
                    "operationId": f"patch{info.kind}",
                    "parameters": params,
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "responses": {"200": {"description": "OK"}},
                },
            }
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes (emulated)", "version": "unversioned"},
            "paths": paths,
            "components": {"schemas": {}},
        }

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for res in self.declared():
            groups[res.group or ""].add(res.version or "")
        return {g: sorted(vs, key=version_priority, reverse=True) for g, vs in groups.items()}

    @staticmethod
    def _group_doc(group: str, versions: list[str]) -> dict[str, Any]:
        docs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": docs, "preferredVersion": docs[0]}

    # ------------------------------------------------------------------ resources

    def _resource_info(self, route: Route) -> kmock.ResourceInfo:
        info = self.info(route.group, route.version, route.plural)
        if info is None:
            raise errors.resource_not_found(f"/{route.group}/{route.version}/{route.plural}")
        if route.namespace is not None and not info.namespaced:
            raise errors.resource_not_found(f"namespaced URL for cluster-scoped {route.plural}")
        if route.subresource is not None and route.subresource not in info.subresources:
            raise errors.resource_not_found(f"{route.plural}/{route.subresource}")
        return info

    def _serve_resource(
        self, raw: aiohttp.web.BaseRequest, route: Route, verb: str, query: dict[str, str], data: Any
    ) -> tuple[Any, int]:
        info = self._resource_info(route)
        dry_run = query.get("dryRun") == "All"
        key = (route.group, route.plural)
        as_table = tables.wants_table(raw.headers.get("Accept"))
        with self.state_lock:
            if verb == "list":
                items = self._select(key, route.namespace, query)
                items = [self._view(obj, route) for obj in items]
                rv = str(self._rv)
                if as_table:
                    return self._table(route, items, rv, query), 200
                list_kind = f"{info.kind}List"
                api_version = f"{route.group}/{route.version}" if route.group else route.version
                return {
                    "kind": list_kind,
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }, 200
            if verb == "get":
                assert route.name is not None
                obj = self._store[key].get((route.namespace, route.name))
                if obj is None:
                    raise errors.not_found(route.plural, route.group, route.name)
                if as_table:
                    return self._table(route, [self._view(obj, route)], obj["metadata"]["resourceVersion"], query), 200
                return self._view(obj, route), 200
            if verb == "create":
                if route.name is not None or route.subresource is not None:
                    raise errors.method_not_allowed()
                obj = self.create_object(
                    route.group, route.version, route.plural, route.namespace, data, dry_run=dry_run
                )
                return self._view(obj, route), 201
            if verb == "update":
                assert route.name is not None
                obj = self.replace_object(route, data, dry_run=dry_run)
                return self._view(obj, route), 200
            if verb == "patch":
                assert route.name is not None
                content_type = raw.headers.get("Content-Type", patching.MERGE)
                obj, created = self.patch_object(route, content_type, data, query, dry_run=dry_run)
                return self._view(obj, route), 201 if created else 200
            if verb == "delete":
                assert route.name is not None
                obj, gone = self.delete_object(
                    route.group, route.plural, route.namespace, route.name, data or {}, dry_run=dry_run
                )
                return self._view(obj, route), 200 if gone else 202
            if verb == "deletecollection":
                items = self._select(key, route.namespace, query)
                for obj in items:
                    meta = obj["metadata"]
                    self.delete_object(
                        route.group, route.plural, meta.get("namespace"), meta["name"], data or {}, dry_run=dry_run
                    )
                return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}, 200
        raise errors.method_not_allowed()

    def _select(self, key: StoreKey, namespace: str | None, query: Mapping[str, str]) -> list[dict[str, Any]]:
        label_match = selectors.parse_label_selector(query.get("labelSelector"))
        field_match = selectors.parse_field_selector(query.get("fieldSelector"), key[1])
        objs = self._store[key]
        return [
            objs[k]
            for k in sorted(objs, key=lambda k: (k[0] or "", k[1]))
            if (namespace is None or k[0] == namespace) and label_match(objs[k]) and field_match(objs[k])
        ]

    @staticmethod
    def _view(obj: dict[str, Any], route: Route) -> dict[str, Any]:
        """The object as seen through the requested version (no conversion: same schema for all versions)."""
        api_version = f"{route.group}/{route.version}" if route.group else route.version
        if obj.get("apiVersion") == api_version:
            return obj
        return dict(obj, apiVersion=api_version)

    def _table(
        self, route: Route, objs: list[dict[str, Any]], rv: str, query: Mapping[str, str], with_definitions: bool = True
    ) -> dict[str, Any]:
        columns = tables.column_definitions(self._printer_columns.get((route.group, route.version, route.plural)))
        include = query.get("includeObject", "Metadata")
        return tables.render_table(
            objs, columns, resource_version=rv, include_object=include, with_definitions=with_definitions
        )

    # ------------------------------------------------------------------ writes (loop thread, under state_lock)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, key: StoreKey, etype: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        if len(self._history) == self._history.maxlen and self._history:
            self._history_floor = self._history[0][0]
        self._history.append((rv, key, etype, obj, old))
        on_loop = self.loop is None or threading.get_ident() == self._loop_thread
        for watcher in list(self._watchers.get(key, ())):
            if on_loop:
                watcher.offer(etype, obj, old)
            else:  # a write from a test thread: asyncio queues are not thread-safe
                self.loop.call_soon_threadsafe(watcher.offer, etype, obj, old)  # type: ignore[union-attr]
        self.changed.notify_all()

    def _validate_meta(self, group: str, plural: str, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name = meta.get("name", "")
        causes: list[tuple[str, str]] = []
        key = (group, plural)
        limit = 63 if key in LABEL_LENGTH_NAMED else 253
        pattern = _DNS_LABEL_RE if key in LABEL_NAMED else _SUBDOMAIN_RE
        if group == "" and plural in ("events", "secrets", "configmaps", "serviceaccounts"):
            pattern = _SUBDOMAIN_RE
        if len(name) > limit:
            causes.append(("metadata.name", f'Invalid value: "{name}": must be no more than {limit} characters'))
        elif not pattern.match(name):
            causes.append(
                (
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 name must consist of '
                    "lower case alphanumeric characters, '-' or '.', and must start and end with an "
                    "alphanumeric character",
                )
            )
        for label, value in (meta.get("labels") or {}).items():
            prefix, _, label_name = str(label).rpartition("/")
            if not _LABEL_NAME_RE.match(label_name) or len(label_name) > 63 or len(prefix) > 253:
                causes.append(("metadata.labels", f'Invalid value: "{label}": name part must be a valid label key'))
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.match(value):
                causes.append(
                    (
                        "metadata.labels",
                        f'Invalid value: "{value}": a valid label must be an empty string '
                        'or consist of alphanumeric characters, "-", "_" or ".", at most 63 characters',
                    )
                )
        for i, ref in enumerate(meta.get("ownerReferences") or []):
            for field in ("apiVersion", "kind", "name", "uid"):
                if not ref.get(field):
                    causes.append((f"metadata.ownerReferences[{i}].{field}", "Required value"))
        if causes:
            raise errors.invalid(plural, group, name, kind, causes)

    def create_object(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str | None,
        body: Any,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """POST semantics: server-set metadata, 409 on an existing name, status dropped, ADDED event."""
        info = self.info(group, version, plural)
        if info is None:
            raise errors.resource_not_found(f"{group}/{version}/{plural}")
        if not isinstance(body, dict):
            raise errors.bad_request("the request body must be a JSON object")
        key = (group, plural)
        with self.state_lock:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if info.namespaced:
                if namespace is None:
                    namespace = meta.get("namespace") or None
                if namespace is None:
                    raise errors.bad_request("the namespace of the object is required")
                if meta.get("namespace") not in (None, "", namespace):
                    raise errors.bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request"
                    )
                meta["namespace"] = namespace
                self._check_namespace(namespace)
            else:
                namespace = None
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(
                    secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5)
                )
            if not meta.get("name"):
                raise errors.invalid(
                    plural,
                    group,
                    None,
                    info.kind or plural,
                    [("metadata.name", "Required value: name or generateName is required")],
                )
            name = meta["name"]
            if (namespace, name) in self._store[key]:
                raise errors.already_exists(plural, group, name)
            obj["apiVersion"] = f"{group}/{version}" if group else version
            obj["kind"] = info.kind
            self._validate_meta(group, plural, info.kind or plural, obj)
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"):
                meta.pop(field, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            meta["generation"] = 1
            if "status" in info.subresources or key == NAMESPACE_KEY:
                obj.pop("status", None)
            if key == NAMESPACE_KEY:
                obj.setdefault("spec", {"finalizers": ["kubernetes"]})
                obj["status"] = {"phase": "Active"}
            if key == CRD_KEY:
                self._crd_status(obj)
            if dry_run:
                meta["resourceVersion"] = str(self._rv)
                return obj
            meta["resourceVersion"] = self._next_rv()
            self._store[key][(namespace, name)] = obj
            if key == CRD_KEY:
                self._register_crd(obj)
            self._emit(key, "ADDED", obj, None)
            return obj

    def _check_namespace(self, namespace: str) -> None:
        if not self.strict_namespaces:
            return
        ns = self._store[NAMESPACE_KEY].get((None, namespace))
        if ns is None:
            raise errors.not_found("namespaces", "", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being terminated",
            )

    def replace_object(self, route: Route, body: Any, *, dry_run: bool = False) -> dict[str, Any]:
        """PUT semantics: optimistic concurrency on metadata.resourceVersion; 404 when absent."""
        assert route.name is not None
        if not isinstance(body, dict):
            raise errors.bad_request("the request body must be a JSON object")
        key = (route.group, route.plural)
        with self.state_lock:
            old = self._store[key].get((route.namespace, route.name))
            if old is None:
                raise errors.not_found(route.plural, route.group, route.name)
            new = copy.deepcopy(body)
            meta = new.setdefault("metadata", {})
            if meta.get("name") not in (None, route.name):
                raise errors.bad_request("the name of the object does not match the name on the URL")
            if not meta.get("resourceVersion") and key in self._custom_keys:
                info = self._resource_info(route)
                raise errors.invalid(
                    route.plural,
                    route.group,
                    route.name,
                    info.kind or route.plural,
                    [("metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")],
                )
            return self._commit(route.group, route.version, route.plural, old, new, route.subresource, dry_run=dry_run)

    def patch_object(
        self, route: Route, content_type: str, patch: Any, query: Mapping[str, str], *, dry_run: bool = False
    ) -> tuple[dict[str, Any], bool]:
        """PATCH semantics per content type; server-side apply creates a missing object."""
        assert route.name is not None
        key = (route.group, route.plural)
        with self.state_lock:
            old = self._store[key].get((route.namespace, route.name))
            is_apply = content_type.startswith("application/apply-patch")
            if is_apply and not query.get("fieldManager"):
                raise errors.bad_request("PATCH, application/apply-patch+yaml requires fieldManager to be set")
            if old is None:
                if is_apply and route.subresource is None:
                    body = copy.deepcopy(patch) if isinstance(patch, dict) else {}
                    body.setdefault("metadata", {})["name"] = route.name
                    created = self.create_object(
                        route.group, route.version, route.plural, route.namespace, body, dry_run=dry_run
                    )
                    return created, True
                raise errors.not_found(route.plural, route.group, route.name)
            if patch is None:
                raise errors.bad_request("the patch body is empty")
            new = patching.apply_patch(content_type, old, patch)
            if not isinstance(new, dict):
                raise errors.unprocessable("the patch does not produce an object")
            return self._commit(
                route.group, route.version, route.plural, old, new, route.subresource, dry_run=dry_run
            ), False

    def _commit(
        self,
        group: str,
        version: str,
        plural: str,
        old: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Common update path: precondition, subresource split, system fields, generation, no-op, finalizers."""
        key = (group, plural)
        old_meta = old["metadata"]
        name = old_meta["name"]
        new_meta = new.setdefault("metadata", {}) if isinstance(new.get("metadata"), dict) else {}
        wanted_rv = new_meta.get("resourceVersion")
        if wanted_rv not in (None, "") and str(wanted_rv) != old_meta["resourceVersion"]:
            raise errors.conflict(plural, group, name)
        has_status = self.has_status_subresource(group, plural)
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        elif subresource is None:
            result = new
            result["metadata"] = new_meta
            if has_status:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
        else:
            raise errors.method_not_allowed(f"subresource {subresource!r} is not writable in the emulator")
        meta = result["metadata"]
        for field in (
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "name",
        ):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        result["apiVersion"] = old["apiVersion"]
        result["kind"] = old["kind"]
        self._validate_meta(group, plural, old["kind"], result)
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise errors.invalid(
                    plural,
                    group,
                    name,
                    old["kind"],
                    [
                        (
                            "metadata.finalizers",
                            f"Forbidden: no new finalizers can be added if the object is being "
                            f"deleted, found new finalizers {sorted(added)!r}",
                        ),
                    ],
                )
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if result == old:
            return old  # a no-op write: no new resourceVersion, no event (as the real server)
        ignored = {"metadata", "status"} if has_status else {"metadata"}
        spec_changed = any(
            result.get(k) != old.get(k) for k in (set(result) | set(old)) - ignored - {"apiVersion", "kind"}
        )
        if spec_changed:
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if key == CRD_KEY:
            self._crd_status(result)
        if dry_run:
            return result
        meta["resourceVersion"] = self._next_rv()
        objkey = (old_meta.get("namespace"), name)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, objkey, result, old)
            return result
        self._store[key][objkey] = result
        if key == CRD_KEY:
            self._register_crd(result)
        self._emit(key, "MODIFIED", result, old)
        return result

    def delete_object(
        self,
        group: str,
        plural: str,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """DELETE: preconditions, finalizers (deletionTimestamp), propagation policy. Returns (obj, gone)."""
        key = (group, plural)
        with self.state_lock:
            old = self._store[key].get((namespace, name))
            if old is None:
                raise errors.not_found(plural, group, name)
            meta = old["metadata"]
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise errors.conflict(
                    plural,
                    group,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise errors.conflict(
                    plural,
                    group,
                    name,
                    "Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}",
                )
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is True:
                policy = "Orphan"
            policy = policy or "Background"
            if dry_run:
                return old, False
            finalizers = list(meta.get("finalizers") or [])
            if policy == "Foreground" and "foregroundDeletion" not in finalizers and not meta.get("deletionTimestamp"):
                finalizers.append("foregroundDeletion")
            if policy == "Orphan" and "orphan" not in finalizers and not meta.get("deletionTimestamp"):
                finalizers.append("orphan")
            if key == NAMESPACE_KEY:
                finalizers = [*finalizers, "kubernetes"] if "kubernetes" not in finalizers else finalizers
            if finalizers:
                if meta.get("deletionTimestamp"):
                    return old, False
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                new["metadata"]["finalizers"] = finalizers
                if key == NAMESPACE_KEY:
                    new["status"] = {"phase": "Terminating"}
                new["metadata"]["resourceVersion"] = self._next_rv()
                self._store[key][(namespace, name)] = new
                self._emit(key, "MODIFIED", new, old)
                self._soon(self._finalize_system, key, (namespace, name))
                return new, False
            final = copy.deepcopy(old)
            final["metadata"]["resourceVersion"] = self._next_rv()
            self._remove(key, (namespace, name), final, old)
            return final, True

    def _remove(self, key: StoreKey, objkey: ObjKey, final: dict[str, Any], old: dict[str, Any]) -> None:
        del self._store[key][objkey]
        self._emit(key, "DELETED", final, old)
        if key == CRD_KEY:
            self._unregister_crd(final)
        uid = final["metadata"]["uid"]
        self._soon(self._collect_dependents, uid, False)
        namespace = final["metadata"].get("namespace")
        if namespace is not None:
            self._soon(self._finish_namespace, namespace)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a background controller step after the current request (like the GC controller would)."""

        def step() -> None:
            with self.state_lock:
                fn(*args)

        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(step)
        else:
            step()

    # ------------------------------------------------------------------ controllers: GC, finalizers, namespaces

    def _dependents(self, uid: str) -> list[tuple[StoreKey, dict[str, Any]]]:
        return [
            (key, obj)
            for key, objs in self._store.items()
            for obj in list(objs.values())
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _alive(self, uid: str) -> bool:
        return any(obj["metadata"]["uid"] == uid for objs in self._store.values() for obj in objs.values())

    def _collect_dependents(self, uid: str, orphan: bool) -> None:
        """The garbage collector: delete (or orphan) the dependents of a gone owner, cascading."""
        for key, obj in self._dependents(uid):
            meta = obj["metadata"]
            objkey = (meta.get("namespace"), meta["name"])
            if self._store[key].get(objkey) is not obj:
                continue
            refs = meta.get("ownerReferences") or []
            others = [ref for ref in refs if ref.get("uid") != uid and self._alive(ref["uid"])]
            if orphan or others:
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [ref for ref in refs if ref.get("uid") != uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._commit(key[0], obj["apiVersion"].rpartition("/")[2], key[1], obj, new, None)
            elif not meta.get("deletionTimestamp"):
                self.delete_object(key[0], key[1], objkey[0], objkey[1], {"propagationPolicy": "Background"})

    def _finalize_system(self, key: StoreKey, objkey: ObjKey) -> None:
        """Work of the system finalizers: foregroundDeletion, orphan (GC) and kubernetes (namespaces)."""
        obj = self._store[key].get(objkey)
        if obj is None:
            return
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        uid = meta["uid"]
        if "orphan" in finalizers:
            self._collect_dependents(uid, True)
            finalizers.remove("orphan")
        if "foregroundDeletion" in finalizers:
            self._collect_dependents(uid, False)
            if any(True for _ in self._dependents(uid)):
                return  # the last dependent's removal calls us again through _finish_owner
            finalizers.remove("foregroundDeletion")
        if key == NAMESPACE_KEY and "kubernetes" in finalizers:
            namespace = objkey[1]
            for other_key, objs in list(self._store.items()):
                for ns, name in list(objs):
                    if ns == namespace:
                        self.delete_object(other_key[0], other_key[1], ns, name, {})
            if any(ns == namespace for objs in self._store.values() for (ns, _) in objs):
                return  # objects with finalizers remain; _finish_namespace retries when they go
            finalizers.remove("kubernetes")
        if finalizers != list(meta.get("finalizers") or []):
            new = copy.deepcopy(obj)
            new["metadata"]["finalizers"] = finalizers
            version = obj["apiVersion"].rpartition("/")[2]
            self._commit(key[0], version, key[1], obj, new, None)

    def _finish_namespace(self, namespace: str) -> None:
        ns = self._store[NAMESPACE_KEY].get((None, namespace))
        if ns is not None and ns["metadata"].get("deletionTimestamp"):
            self._finalize_system(NAMESPACE_KEY, (None, namespace))
        # Foreground owners waiting for their dependents to go:
        for key, objs in list(self._store.items()):
            for objkey, obj in list(objs.items()):
                if "foregroundDeletion" in (obj["metadata"].get("finalizers") or []) and obj["metadata"].get(
                    "deletionTimestamp"
                ):
                    self._finalize_system(key, objkey)

    # ------------------------------------------------------------------ CRDs

    @staticmethod
    def _crd_status(crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        now = now_rfc3339()
        storage = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
        crd["status"] = {
            "acceptedNames": spec.get("names") or {},
            "storedVersions": storage,
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now,
                },
            ],
        }

    def _register_crd(self, crd: dict[str, Any]) -> None:
        """Make a stored CRD's served versions appear in discovery, with its printer columns."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural = spec.get("group", ""), names.get("plural", "")
        registered: set[kmock.resource] = set()
        for ver in spec.get("versions") or []:
            if not ver.get("served", True):
                continue
            subs = ver.get("subresources") or {}
            res = self.register(
                f"{group}/{ver['name']}/{plural}",
                names.get("kind", plural.capitalize()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status="status" in subs,
                shortnames=names.get("shortNames") or [],
                categories=names.get("categories") or [],
                printer_columns=list(ver.get("additionalPrinterColumns") or []),
                scale="scale" in subs,
            )
            if names.get("singular"):
                self.resources[res].singular = names["singular"]
            registered.add(res)
        crd_name = crd["metadata"]["name"]
        for stale in self._crd_resources.get(crd_name, set()) - registered:
            if stale in self.resources:
                del self.resources[stale]
        self._crd_resources[crd_name] = registered

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        for res in self._crd_resources.pop(crd["metadata"]["name"], set()):
            if res in self.resources:
                del self.resources[res]
            key = (res.group or "", res.plural or "")
            for objkey, obj in list(self._store[key].items()):
                gone = copy.deepcopy(obj)
                gone["metadata"]["resourceVersion"] = self._next_rv()
                del self._store[key][objkey]
                self._emit(key, "DELETED", gone, obj)

    # ------------------------------------------------------------------ watch

    async def _serve_watch_stream(
        self, raw: aiohttp.web.BaseRequest, route: Route, query: dict[str, str]
    ) -> aiohttp.web.StreamResponse:
        info = self._resource_info(route)
        key = (route.group, route.plural)
        field_selector = query.get("fieldSelector")
        if route.name is not None:
            by_name = f"metadata.name={route.name}"
            field_selector = f"{field_selector},{by_name}" if field_selector else by_name
        watcher = Watcher(
            key,
            route.version,
            route.namespace,
            selectors.parse_label_selector(query.get("labelSelector")),
            selectors.parse_field_selector(field_selector, route.plural),
        )
        as_table = tables.wants_table(raw.headers.get("Accept"))
        # timeoutSeconds=0 or absent: no client timeout (the real server then picks 30-60 min; we never end).
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds", "0") != "0" else None
        rv_text = query.get("resourceVersion") or ""
        initial: list[tuple[str, dict[str, Any]]] = []
        expired = False
        bookmark_initial = query.get("sendInitialEvents") == "true"
        with self.state_lock:
            if rv_text in ("", "0") or bookmark_initial:
                initial = [("ADDED", obj) for obj in self._store[key].values() if watcher.matches(obj)]
            else:
                since = int(rv_text) if rv_text.isdigit() else 0
                if since < self._history_floor:
                    expired = True
                else:
                    for rv, ekey, etype, obj, old in self._history:
                        if ekey == key and rv > since and (seen := watcher.translate(etype, obj, old)):
                            initial.append((seen, obj))
            if bookmark_initial:
                initial.append(
                    (
                        "BOOKMARK",
                        {
                            "kind": info.kind,
                            "apiVersion": f"{route.group}/{route.version}" if route.group else route.version,
                            "metadata": {
                                "resourceVersion": str(self._rv),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    )
                )
            if not expired:
                self._watchers[key].add(watcher)
                self.changed.notify_all()  # tests may wait for a watch to be established
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(raw)
        first_table = True

        async def send(etype: str, obj: dict[str, Any]) -> None:
            nonlocal first_table
            shown = self._view(obj, route)
            if as_table and etype != "ERROR" and etype != "BOOKMARK":
                shown = self._table(
                    route, [shown], obj["metadata"]["resourceVersion"], query, with_definitions=first_table
                )
                first_table = False
            await response.write(json.dumps({"type": etype, "object": shown}).encode() + b"\n")

        try:
            if expired:
                error = errors.gone(f"too old resource version: {rv_text} ({self._history_floor})").status()
                await response.write(json.dumps({"type": "ERROR", "object": error}).encode() + b"\n")
                await response.write_eof()
                return response
            for etype, obj in initial:
                await send(etype, obj)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if item is None:
                    break
                await send(*item)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        finally:
            with self.state_lock:
                self._watchers[key].discard(watcher)
                self.changed.notify_all()
        return response


def _name_of(data: Any) -> str | None:
    if isinstance(data, dict):
        name = (data.get("metadata") or {}).get("name")
        return name if isinstance(name, str) else None
    return None
