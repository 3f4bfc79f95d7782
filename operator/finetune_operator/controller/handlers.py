"""kopf handlers: ``kopf run -m finetune_operator.controller.handlers`` (or ``ftctl operator``).

The handlers are ``async`` although they only enqueue: kopf runs synchronous handlers in a thread pool, and
the hand-off through it cost more than the whole reconcile under load.

Every handler here is an ``@kopf.on.event`` that only enqueues the FineTuneJob concerned; the reconciling
is done by :class:`~finetune_operator.controller.runtime.Controller` (see that module for why: no kopf state
annotations, no finalizers). Children are watched with a label selector (``app.kubernetes.io/managed-by=
finetune-operator``), so the operator never receives events of unrelated Jobs or Deployments; the owning
FineTuneJob is found through the child's controller ownerReference.

Settings chosen in :func:`configure`:

* ``watching.server_timeout``/``client_timeout``: watches are re-opened every few minutes, so a silently
  dropped connection (a load balancer's idle timeout) is noticed; kopf resumes from the last resourceVersion.
* ``posting.reporting_component``: kopf's own events carry our name. (Our transition events are posted by
  :class:`~finetune_operator.controller.runtime.ApiEventSink`.)
* ``persistence``: nothing is persisted by kopf for event handlers. The diff-base storage is
  :class:`NoDiffBaseStorage` (kopf would otherwise deep-copy every object on every event to diff it for
  handlers we do not have); the progress storage points at our own annotation prefix so that nothing
  ``kopf.zalando.org/*`` appears should a future handler need state.
* ``execution.max_workers``: the handlers are async, no thread pool needed beyond kopf's default.
* ``networking.error_backoffs``: a :class:`CappedBackoff` without end. kopf retries a failing API request
  once per element and escalates after the last one; with its default (9 attempts, ~54 s) an API outage of a
  minute ended the resource observer and with it the process. A Deployment restarting its pod is no cure (the
  restart meets the same outage, and a crash loop backs off for minutes), so the operator waits it out:
  exponential delays up to ``api_retry_max`` seconds, for as long as the outage lasts, then converges
  (every reconcile is level-based). Our own API client and work queue retry the same way (capped backoff).

Login: one handler, :func:`login`, the same :func:`~finetune_operator.controller.kube.login` the operator's own
client uses, so kopf's watches and the reconciler's requests run with the same credentials (and kopf does not
fall back to its sync-client login, which needs the ``kubernetes`` package the operator no longer installs).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import kopf

from finetune_operator.api import constants as c
from finetune_operator.controller import children as ch
from finetune_operator.controller import kube
from finetune_operator.controller.runtime import Controller, OperatorConfig

log = logging.getLogger(__name__)


#: Key of the :class:`OperatorConfig` in kopf's memo (``ftctl operator`` and tests put one there).
MEMO_CONFIG = "finetune_config"
MEMO_CONTROLLER = "finetune_controller"
_MANAGED = {c.LABEL_MANAGED_BY: c.MANAGER}


class NoDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """A diff-base storage that neither stores nor computes anything.

    kopf builds a deep copy of every object's "essence" on every watch event, to detect changes for
    create/update handlers. This operator has none (only ``on.event`` handlers, see
    :mod:`~finetune_operator.controller.runtime`), and those copies of FineTuneJobs and pod templates were
    most of kopf's CPU per event. Do not combine it with change-detecting handlers.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


class CappedBackoff:
    """kopf's ``error_backoffs`` that never run out: ``initial``, doubling up to ``cap``, with jitter.

    kopf counts attempts only when the backoffs are ``Sized``; this is iterable and not sized, so a request
    is retried for as long as it fails. Each request iterates afresh (it starts again at ``initial``).
    """

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = max(cap, initial)

    def __iter__(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.cap)


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Apply the operator's kopf settings (see the module docstring for the why of each)."""
    settings.posting.reporting_component = c.MANAGER
    settings.watching.server_timeout = config.watch_timeout
    settings.watching.client_timeout = config.watch_timeout + 30
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 1.0
    settings.networking.error_backoffs = CappedBackoff(config.api_retry_initial, config.api_retry_max)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = NoDiffBaseStorage(prefix=c.GROUP)
    settings.persistence.finalizer = f"{c.GROUP}/finalizer"


def _controller(memo: Any) -> Controller | None:
    ctl = memo.get(MEMO_CONTROLLER) if hasattr(memo, "get") else None
    return ctl if isinstance(ctl, Controller) else None


def _config(memo: Any) -> OperatorConfig:
    config = memo.get(MEMO_CONFIG) if hasattr(memo, "get") else None
    return config if isinstance(config, OperatorConfig) else OperatorConfig.from_env()


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials: the same as the operator client's (:func:`~finetune_operator.controller.kube.login`)."""
    return await kube.login(settings=settings, logger=logger, in_cluster=_config(memo).kubeconfig is None)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = _config(memo)
    configure(settings, config)
    controller = await Controller.create(config, settings=settings)
    controller.start()
    memo[MEMO_CONTROLLER] = controller
    log.info("finetune-operator started (worker image %s, vLLM image %s)", config.worker_image, config.vllm_image)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller = _controller(memo)
    if controller is not None:
        await controller.stop()


@kopf.on.probe(id="reconcileQueue")
def queue_depth(memo: kopf.Memo, **_: Any) -> int:
    """Liveness detail: how many FineTuneJobs wait for a reconcile."""
    controller = _controller(memo)
    return len(controller.queue) if controller is not None else 0


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
async def finetunejob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller = _controller(memo)
    if controller is not None:
        controller.on_ftj_event(type, body)


async def child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller = _controller(memo)
    if controller is not None:
        controller.on_child_event(type, body)


for _group, _version, _plural in ch.WATCHED:
    kopf.on.event(_group, _version, _plural, labels=_MANAGED, id=f"child-{_plural}")(child_event)
