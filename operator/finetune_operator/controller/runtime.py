"""The operator's runtime: configuration, the work queue, the resync timer and the wiring to kopf's events.

kopf is used for what it is best at, watching: it lists and watches FineTuneJobs and the four child kinds
(with reconnects, bookmarks and namespace discovery) and hands every event to :class:`Controller`, which only
enqueues a key. Reconciling happens in the :class:`~finetune_operator.controller.queue.WorkQueue`'s workers.

Only ``@kopf.on.event`` handlers are used, on purpose: kopf's change-detecting handlers (create/update/
resume) and timers persist progress and "last handled" state in annotations and add a finalizer to every
object (timers require one). A level-based reconciler needs neither, so FineTuneJobs carry no kopf
annotations and no finalizer, and deleting one never depends on the operator running. The resync timer
is therefore the operator's own, one task for all jobs with jittered re-adds, instead of one kopf timer task
(and finalizer) per object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.controller import children as ch
from finetune_operator.controller import metrics
from finetune_operator.controller import spec as specs
from finetune_operator.controller.kube import CachingKube, Kube, RestKube, connect
from finetune_operator.controller.queue import WorkQueue
from finetune_operator.controller.reconciler import EventSink, Reconciler, ReconcilerConfig
from finetune_operator.validation.policy import Policy

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name) of a FineTuneJob


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    return float(raw) if raw else default


def _env_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class OperatorConfig:
    """Install-level settings (the Helm chart sets them as environment variables)."""

    #: Worker image for FineTuneJobs without ``spec.image`` (``FT_WORKER_IMAGE``).
    worker_image: str = c.DEFAULT_WORKER_IMAGE
    #: vLLM image for FineTuneJobs without ``spec.serve.image`` (``FT_VLLM_IMAGE``).
    vllm_image: str = c.DEFAULT_VLLM_IMAGE
    #: A shared ServiceAccount for progress-reporting worker pods (``FT_WORKER_SERVICE_ACCOUNT``); empty (the
    #: default): each FineTuneJob gets its own, which may patch only that job's status (render/identity.py).
    worker_service_account: str = ""
    #: Seconds between full resyncs of every FineTuneJob (drift repair, missed events) (``FT_RESYNC_SECONDS``).
    resync_interval: float = 60.0
    #: Seconds between drift checks that re-read every object of the current step from the API server instead
    #: of the watch cache (``FT_DRIFT_SECONDS``); rounded up to a multiple of ``resync_interval``.
    drift_interval: float = 300.0
    #: Minimum seconds between progress-only status writes per job (``FT_PROGRESS_INTERVAL_SECONDS``).
    progress_interval: float = 10.0
    #: Seconds between looks at a step's pods while they have not started (a missing Secret fails the job);
    #: growing with the step's age up to 5 minutes (``FT_POD_CHECK_SECONDS``).
    pod_check_interval: float = 5.0
    #: Concurrent reconciles (different jobs) (``FT_RECONCILE_WORKERS``).
    workers: int = 16
    #: Port of the Prometheus ``/metrics`` endpoint; None: not served.
    metrics_port: int | None = None
    #: kubeconfig file given with ``--kubeconfig`` (exported as ``$KUBECONFIG``, read by the login): the
    #: in-cluster ServiceAccount is then not tried. None: in-cluster, then ``$KUBECONFIG``/``~/.kube/config``.
    kubeconfig: str | None = None
    #: Seconds a watch request stays open before kopf reconnects (kopf's ``server_timeout``).
    watch_timeout: float = 300.0
    #: First delay before kopf retries a failed API request; doubled per attempt (``FT_API_RETRY_SECONDS``).
    api_retry_initial: float = 1.0
    #: Longest delay between retries; retries never stop during an outage (``FT_API_RETRY_MAX_SECONDS``).
    api_retry_max: float = 30.0
    #: Images FineTuneJobs may use besides the two defaults (``FT_ALLOWED_IMAGES``, comma-separated; ``*``:
    #: any image).
    allowed_images: tuple[str, ...] = ()
    #: Prefixes of further allowed images (``FT_ALLOWED_IMAGE_PREFIXES``, comma-separated).
    allowed_image_prefixes: tuple[str, ...] = ()
    #: Whether specs may set ``trust_remote_code`` / ``--trust-remote-code`` (``FT_ALLOW_TRUST_REMOTE_CODE``).
    allow_trust_remote_code: bool = False
    #: The answer check after a rollout (controller/answering.py): seconds one chat completion may take
    #: (``FT_ANSWER_TIMEOUT_SECONDS``), the first delay before a failed one is repeated, doubled per failure
    #: (``FT_ANSWER_RETRY_SECONDS``), and the longest delay (``FT_ANSWER_RETRY_MAX_SECONDS``).
    answer_timeout: float = 30.0
    answer_retry_initial: float = 2.0
    answer_retry_max: float = 60.0

    def policy(self) -> Policy:
        """The validation policy of this install: a FineTuneJob grants its author no image the install did not
        allow, whether or not the chart's admission policy is installed."""
        if "*" in self.allowed_images:
            images = None
        else:
            images = frozenset({self.worker_image, self.vllm_image, *self.allowed_images})
        return Policy(
            allowed_images=images,
            allowed_image_prefixes=self.allowed_image_prefixes,
            allow_trust_remote_code=self.allow_trust_remote_code,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> OperatorConfig:
        e = os.environ if env is None else env
        kw: dict[str, Any] = {
            "worker_image": e.get("FT_WORKER_IMAGE") or c.DEFAULT_WORKER_IMAGE,
            "vllm_image": e.get("FT_VLLM_IMAGE") or c.DEFAULT_VLLM_IMAGE,
            "worker_service_account": e.get("FT_WORKER_SERVICE_ACCOUNT") or "",
            "resync_interval": _env_float(e, "FT_RESYNC_SECONDS", 60.0),
            "progress_interval": _env_float(e, "FT_PROGRESS_INTERVAL_SECONDS", 10.0),
            "drift_interval": _env_float(e, "FT_DRIFT_SECONDS", 300.0),
            "pod_check_interval": _env_float(e, "FT_POD_CHECK_SECONDS", 5.0),
            "workers": int(_env_float(e, "FT_RECONCILE_WORKERS", 16)),
            "api_retry_initial": _env_float(e, "FT_API_RETRY_SECONDS", 1.0),
            "api_retry_max": _env_float(e, "FT_API_RETRY_MAX_SECONDS", 30.0),
            "answer_timeout": _env_float(e, "FT_ANSWER_TIMEOUT_SECONDS", 30.0),
            "answer_retry_initial": _env_float(e, "FT_ANSWER_RETRY_SECONDS", 2.0),
            "answer_retry_max": _env_float(e, "FT_ANSWER_RETRY_MAX_SECONDS", 60.0),
        }
        if e.get("FT_METRICS_PORT"):
            kw["metrics_port"] = int(e["FT_METRICS_PORT"])
        kw["allowed_images"] = _env_list(e, "FT_ALLOWED_IMAGES")
        kw["allowed_image_prefixes"] = _env_list(e, "FT_ALLOWED_IMAGE_PREFIXES")
        kw["allow_trust_remote_code"] = e.get("FT_ALLOW_TRUST_REMOTE_CODE", "").lower() in ("1", "true", "yes")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def make_render(config: OperatorConfig) -> Callable[[Any], Any]:
    """The renderer with the install's images; ``backoff_limit=0`` because the operator retries itself
    (re-creating the workload), so pod-level retries would multiply ``spec.retries``."""
    from finetune_operator.render import RenderOptions, render

    options = RenderOptions(
        worker_image=config.worker_image,
        vllm_image=config.vllm_image,
        worker_service_account=config.worker_service_account,
        backoff_limit=0,
    )
    return lambda job: render(job, options)


def make_validate(config: OperatorConfig | None = None) -> Callable[[Mapping[str, Any]], Any]:
    """The same validation ``ftctl validate`` runs (``spec.gate`` included: the operator enforces it, see
    :mod:`finetune_operator.controller.gating`), with the install's policy (allowed images,
    ``trust_remote_code``)."""
    from finetune_operator.validation import validate

    policy = (config or OperatorConfig()).policy()

    def run(obj: Mapping[str, Any]) -> Any:
        return validate(dict(obj), policy)

    return run


class ApiEventSink:
    """Posts core/v1 Events about FineTuneJobs from a queue, with few concurrent posts.

    kopf's own ``kopf.event`` only works inside kopf's per-object handler tasks, and reconciles run in the
    work queue's tasks, so the operator posts its events itself (same format, ``reportingComponent``
    ``finetune-operator``; RBAC: create on events). Events are informational: a reconcile never waits for
    one, and under load they queue behind the API calls that move pipelines forward (``posters`` at a time)
    instead of competing with them.
    """

    def __init__(
        self, kube: Kube, *, component: str = c.MANAGER, instance: str | None = None, posters: int = 2
    ) -> None:
        self.kube = kube
        self.component = component
        self.instance = instance or os.environ.get("HOSTNAME", "finetune-operator")
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._posters = posters
        self._tasks: list[asyncio.Task[None]] = []

    def __call__(self, obj: Mapping[str, Any], type: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = str(meta.get("namespace") or "default")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", c.API_VERSION),
                "kind": obj.get("kind", c.KIND),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type,
            "reason": reason,
            "message": message,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        log.info("%s %s/%s: %s: %s", type, namespace, meta.get("name"), reason, message)
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._post_loop(), name="finetune-events") for _ in range(self._posters)]
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("event queue full; dropped event %s", reason)

    async def _post_loop(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self.kube.create(event)
            except Exception as exc:  # an event is informational: log and go on
                log.warning("could not post event %s: %s", event["reason"], exc)
            finally:
                self._queue.task_done()

    async def close(self, timeout: float = 5.0) -> None:
        """Post what is queued (up to ``timeout``), then stop."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class Controller:
    """Owns the reconciler, its queue and the resync task; kopf handlers call ``on_*_event``."""

    def __init__(self, config: OperatorConfig, kube: Kube, events: EventSink | None = None) -> None:
        self.config = config
        self.cache = CachingKube(kube)
        kube = self.cache
        self.events = events if events is not None else ApiEventSink(kube)  # uncached: events are not read
        self.reconciler = Reconciler(
            kube,
            validate=make_validate(config),
            render=make_render(config),
            events=self.events,
            config=ReconcilerConfig(
                progress_interval=config.progress_interval,
                answer_timeout=config.answer_timeout,
                answer_retry_initial=config.answer_retry_initial,
                answer_retry_max=config.answer_retry_max,
                worker_image=config.worker_image,
                pod_check_interval=config.pod_check_interval,
            ),
        )
        self.queue: WorkQueue[Key] = WorkQueue(self._process, workers=config.workers, on_error=self._on_error)
        self.known: set[Key] = set()
        self._deep: set[Key] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._close: Callable[[], Any] | None = None
        self._metrics_server: Any = None

    @classmethod
    async def create(cls, config: OperatorConfig, *, settings: Any = None) -> Controller:
        """Connect to the API (in-cluster, or the kubeconfig) and build a controller; call :meth:`start` next.
        ``settings`` are kopf's (its ``networking.trust_env`` applies to this client too)."""
        request, close = await connect(settings=settings, in_cluster=config.kubeconfig is None)
        kube = RestKube(
            request,
            on_request=lambda verb, code: metrics.API_REQUESTS.labels(verb=verb, code=str(code)).inc(),
            on_retry=lambda verb, code: metrics.API_RETRIES.labels(verb=verb).inc(),
        )
        self = cls(config, kube)
        self._close = close
        return self

    def start(self) -> None:
        self.queue.start()
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="finetune-resync"))
        self._tasks.append(asyncio.create_task(self._gauge_loop(), name="finetune-gauges"))
        if self.config.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server = start_http_server(self.config.metrics_port)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.queue.stop()
        if isinstance(self.events, ApiEventSink):
            await self.events.close()
        if self._metrics_server is not None:
            server = self._metrics_server[0] if isinstance(self._metrics_server, tuple) else self._metrics_server
            with contextlib.suppress(Exception):
                server.shutdown()
                server.server_close()
        if self._close is not None:
            await self._close()

    # ------------------------------------------------------------------ events (called by kopf)

    def on_ftj_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or "default"), str(meta.get("name")))
        self.cache.observe(type_, dict(body, kind=c.KIND))
        if type_ == "DELETED":
            self.known.discard(key)
            self._deep.discard(key)
            self.queue.forget(key)
            self.reconciler.forget(*key)
            self.cache.forget_namespace_prefix(key[0], key[1])
            return
        first = key not in self.known
        self.known.add(key)
        if first:
            if specs.ANNOTATION_ACCEPTED_SPEC in (meta.get("annotations") or {}):
                # After a restart, verify everything of the current step once. A job without the annotation
                # has no children yet (it is written before the first one): nothing to verify, no reads.
                self._deep.add(key)
        elif self.reconciler.is_own_version(dict(body, kind=c.KIND)):
            return  # the echo of our own write
        self.queue.add(key)

    def on_child_event(self, type_: str | None, body: Mapping[str, Any]) -> None:
        owner = ch.controller_owner(body)
        if owner is None:
            return
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or "default"), str(owner.get("name")))
        self.cache.observe(type_, body)
        if type_ != "DELETED" and self.reconciler.is_own_version(body):
            return
        self.queue.add(key)

    # ------------------------------------------------------------------ internals

    async def _process(self, key: Key) -> float | None:
        deep = key in self._deep
        self._deep.discard(key)
        return await self.reconciler.reconcile(*key, deep=deep)

    def _on_error(self, key: Key, exc: BaseException) -> None:
        metrics.RECONCILE_ERRORS.inc()
        log.warning("reconciling FineTuneJob %s/%s failed (will retry): %s", key[0], key[1], exc, exc_info=exc)

    async def _resync_loop(self) -> None:
        """Every ``resync_interval``, re-add every known job at a random point of the next interval (jitter
        keeps 1000 jobs from hitting the API at the same instant). Those reconciles read from the watch cache
        (catching missed events costs no API call); every ``drift_interval`` they re-read from the server
        and check every object of the current step (drift repair)."""
        interval = self.config.resync_interval
        every = max(1, round(self.config.drift_interval / interval))
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            rounds += 1
            deep = rounds % every == 0
            for key in list(self.known):
                if deep:
                    self._deep.add(key)
                self.queue.add_after(key, random.uniform(0, interval / 2))

    async def _gauge_loop(self) -> None:
        while True:
            metrics.set_job_states(self.reconciler.states)
            metrics.QUEUE_DEPTH.set(len(self.queue))
            await asyncio.sleep(5)
