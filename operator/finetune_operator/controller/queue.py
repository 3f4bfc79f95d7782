"""A work queue with client-go semantics: dedupe, one worker per key at a time, delayed and backoff re-adds.

Why not reconcile directly inside kopf's event handlers: many events (a child's status, a worker's progress
report, our own status write, the resync timer) arrive for the same FineTuneJob within milliseconds. The
queue collapses them into one reconcile that reads the latest state, and guarantees that two reconciles of
the same FineTuneJob never run concurrently (this is the per-FineTuneJob lock, without holding a lock
object per job for 1000 idle jobs). An event that arrives *during* a reconcile marks the key dirty, so it
is reconciled once more afterwards: no event is lost, however they interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

#: A handler returns seconds until the key should be processed again (None: only when an event comes).
Handler = Callable[[K], Awaitable[float | None]]


class WorkQueue(Generic[K]):
    """Keys in, ``handler(key)`` out, with ``workers`` concurrent workers."""

    def __init__(
        self,
        handler: Handler[K],
        *,
        workers: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        on_error: Callable[[K, BaseException], None] | None = None,
    ) -> None:
        self._handler = handler
        self._workers = workers
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._on_error = on_error
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ adding

    def add(self, key: K) -> None:
        """Process ``key`` soon (once, however often it is added before a worker takes it)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        if key in self._dirty:
            return
        self._dirty.add(key)
        self._idle.clear()
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Process ``key`` in ``delay`` seconds (an earlier pending add wins)."""
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        existing = self._timers.get(key)
        if existing is not None:
            if existing[0] <= due:
                return
            existing[1].cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = (due, loop.call_later(delay, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: K) -> None:
        """Drop pending timers and failure counts of a key (its object was deleted)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        self._failures.pop(key, None)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"finetune-reconcile-{i}"))

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer[1].cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def wait_idle(self) -> None:
        """Until nothing is queued or processing (pending timers do not count). For tests and benchmarks."""
        await self._idle.wait()

    def __len__(self) -> int:
        return len(self._dirty) + len(self._processing)

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._processing.add(key)
            self._dirty.discard(key)
            try:
                delay = await self._handler(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                if self._on_error is not None:
                    self._on_error(key, exc)
                else:
                    log.exception("reconciling %s failed", key)
                delay = min(self._backoff * 2 ** (n - 1), self._max_backoff)
            else:
                self._failures.pop(key, None)
            finally:
                self._processing.discard(key)
            if key in self._dirty:
                self._queue.put_nowait(key)
            elif delay is not None:
                self.add_after(key, delay)
            if not self._dirty and not self._processing:
                self._idle.set()
