"""A stage's loss history in status: bounded, downsampled, shaped like the curve it stands for.

Why in status at all: on a cluster the trainer log lives on a PVC a user may not be able to mount, and
``kubectl get ftj`` shows one number. The operator already receives the worker's periodic reports
(``status.reported.<stage>``); each new step it sees becomes a point of ``status.stages[].history``.

Why bounded and merged, not truncated: a status object is stored in etcd (1.5 MiB per object) and sent to every
watcher on every change, so the history must stay small — :data:`MAX_POINTS` points — for runs of any length.
Dropping old points would lose the start of the curve, which is where loss moves most. Instead, when a point
is added to a full history, the two neighbouring points that cover the *shortest span of steps* are merged
into one (mean loss and learning rate weighted by how many reports each stands for, at the later step). Dense
stretches get coarser first, so the history stays spread evenly over the run; the first point (the starting
loss) and the newest points are never merged away. The rule is deterministic: the same reports always give
the same history, which the operator's byte-identical status writes rely on.

Everything here is pure (no I/O): the operator, ``ftctl plot --job`` and the console use it alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from finetune_operator.api.types import LossPoint

#: The most points a stage's history holds (the CRD schema enforces it too).
MAX_POINTS = 200
#: The newest points are never merged: they show the live end of the curve at full resolution.
KEEP_NEWEST = 8


def _mean(a: float | None, wa: int, b: float | None, wb: int) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return (a * wa + b * wb) / (wa + wb)


def merge_pair(older: LossPoint, newer: LossPoint) -> LossPoint:
    """One point standing for both: at the newer step, means weighted by the reports each stands for."""
    return LossPoint(
        step=newer.step,
        loss=_mean(older.loss, older.samples, newer.loss, newer.samples),
        learning_rate=_mean(older.learning_rate, older.samples, newer.learning_rate, newer.samples),
        epoch=newer.epoch if newer.epoch is not None else older.epoch,
        samples=older.samples + newer.samples,
    )


def _narrowest_pair(points: Sequence[LossPoint], keep_newest: int) -> int:
    """Index ``i`` of the pair (i, i+1) to merge: the shortest step span, oldest first on ties.

    The first point (i = 0 is never merged *into*: pairs start at 1) and the ``keep_newest`` last points are
    left alone.
    """
    last = len(points) - 1 - keep_newest  # the pair (i, i+1) must end before the protected tail
    best, best_span = 1, None
    for i in range(1, max(last, 1)):
        span = points[i + 1].step - points[i - 1].step
        if best_span is None or span < best_span:
            best, best_span = i, span
    return best


def add_point(history: Sequence[LossPoint], point: LossPoint, max_points: int = MAX_POINTS) -> list[LossPoint]:
    """``history`` with ``point`` appended (or replacing the last point of the same step), then merged down.

    A report for a step at or before the last point's step (a resumed run re-reporting, a repeated report)
    replaces the points from that step on: the history follows the run that is actually training.
    """
    if max_points < KEEP_NEWEST + 3:
        raise ValueError(f"max_points must be at least {KEEP_NEWEST + 3}")
    out = [p for p in history if p.step < point.step]
    out.append(point)
    while len(out) > max_points:
        i = _narrowest_pair(out, KEEP_NEWEST)
        out[i : i + 2] = [merge_pair(out[i], out[i + 1])]
    return out


def downsample(points: Iterable[LossPoint], max_points: int = MAX_POINTS) -> list[LossPoint]:
    """Points added one by one, as the operator would have seen them (for a whole trainer log at once)."""
    out: list[LossPoint] = []
    for p in points:
        out = add_point(out, p, max_points)
    return out


def point_from_report(report: Mapping[str, Any] | None) -> LossPoint | None:
    """The point a worker report (``status.reported.<stage>``, camelCase) stands for; None without one.

    Reports are untrusted input (a pod wrote them): anything that is not a finite number of the right kind is
    ignored rather than trusted.
    """
    if not isinstance(report, Mapping):
        return None
    step = report.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None

    def num(key: str) -> float | None:
        v = report.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        f = float(v)
        return f if f == f and f not in (float("inf"), float("-inf")) else None

    loss, lr, epoch = num("loss"), num("learningRate"), num("epoch")
    if loss is None and lr is None:
        return None
    return LossPoint(step=step, loss=loss, learning_rate=lr, epoch=epoch)


def parse_history(raw: Any) -> list[LossPoint]:
    """``status.stages[].history`` as read from the API (camelCase dicts); malformed entries are skipped."""
    if not isinstance(raw, list):
        return []
    out: list[LossPoint] = []
    for item in raw:
        if isinstance(item, Mapping):
            try:
                out.append(LossPoint.model_validate(item))
            except ValueError:
                continue
    return out


def to_status(history: Sequence[LossPoint]) -> list[dict[str, Any]]:
    """camelCase dicts for ``status.stages[].history`` (unset fields left out)."""
    return [p.model_dump(by_alias=True, exclude_none=True) for p in history]
