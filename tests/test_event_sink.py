"""The operator's Event poster waits for the work queue, not the other way round."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from finetune_operator.controller.runtime import ApiEventSink

FTJ = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "n"}}


class Recorder:
    def __init__(self) -> None:
        self.posted: list[str] = []
        self.one_posted = asyncio.Event()

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.posted.append(obj["reason"])
        self.one_posted.set()
        return dict(obj)


async def test_events_wait_until_the_reconciles_are_done_then_go_out_together() -> None:
    kube = Recorder()
    idle = asyncio.Event()
    sink = ApiEventSink(kube, yield_to=idle.wait, max_delay=30, posters=1)  # type: ignore[arg-type]
    for reason in ("StageSucceeded", "StageStarted", "Serving"):
        sink(FTJ, "Normal", reason, "m")
    await asyncio.sleep(0)  # let the poster start (it must now be waiting for the queue, not posting)
    assert kube.posted == []
    idle.set()
    await asyncio.wait_for(kube.one_posted.wait(), 5)
    await sink.close()
    assert kube.posted == ["StageSucceeded", "StageStarted", "Serving"]


async def test_under_sustained_load_events_still_go_out_after_max_delay() -> None:
    kube = Recorder()
    never_idle = asyncio.Event()
    sink = ApiEventSink(kube, yield_to=never_idle.wait, max_delay=0.05, posters=1)  # type: ignore[arg-type]
    sink(FTJ, "Normal", "StageStarted", "m")
    await asyncio.wait_for(kube.one_posted.wait(), 5)
    await sink.close()
    assert kube.posted == ["StageStarted"]
