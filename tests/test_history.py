"""The loss history kept in status: bounded, deterministic, shaped like the curve, untrusted input ignored."""

from __future__ import annotations

import itertools
import math

import pytest

from finetune_operator.api.history import (
    KEEP_NEWEST,
    MAX_POINTS,
    add_point,
    downsample,
    parse_history,
    point_from_report,
    to_status,
)
from finetune_operator.api.types import LossPoint


def curve(n: int) -> list[LossPoint]:
    return [LossPoint(step=i, loss=2.0 * math.exp(-i / (n / 5)) + 0.1, learning_rate=1e-4) for i in range(1, n + 1)]


def test_short_history_is_kept_as_reported() -> None:
    points = curve(50)
    assert downsample(points) == points


@pytest.mark.parametrize("n", [MAX_POINTS + 1, 1000, 5000])
def test_long_history_is_bounded_and_keeps_its_ends(n: int) -> None:
    points = curve(n)
    h = downsample(points)
    assert len(h) == MAX_POINTS
    assert h[0] == points[0]  # the starting loss is never merged away
    assert h[-KEEP_NEWEST:] == points[-KEEP_NEWEST:]  # the live end at full resolution
    assert sum(p.samples for p in h) == n  # every report is accounted for exactly once
    assert [p.step for p in h] == sorted({p.step for p in h})


def test_merged_points_spread_evenly_and_follow_the_curve() -> None:
    n = 4000
    h = downsample(curve(n))
    gaps = [b.step - a.step for a, b in itertools.pairwise(h[1:-KEEP_NEWEST])]
    assert max(gaps) <= 3 * (n / MAX_POINTS)  # no hole in the curve
    for p in h:  # a merged point's loss lies on the curve over the steps it stands for
        lo = 2.0 * math.exp(-p.step / (n / 5)) + 0.1
        hi = 2.0 * math.exp(-(p.step - p.samples + 1) / (n / 5)) + 0.1
        assert p.loss is not None and lo - 1e-9 <= p.loss <= hi + 1e-9


def test_downsampling_is_deterministic() -> None:
    assert downsample(curve(1234)) == downsample(curve(1234))


def test_a_resumed_run_replaces_the_steps_it_repeats() -> None:
    h = downsample(curve(30))
    h = add_point(h, LossPoint(step=20, loss=9.0))
    assert h[-1] == LossPoint(step=20, loss=9.0)
    assert all(p.step < 20 for p in h[:-1])


@pytest.mark.parametrize(
    "report",
    [
        None,
        "x",
        {"loss": 1.0},
        {"step": -1, "loss": 1.0},
        {"step": True, "loss": 1.0},
        {"step": 1.5, "loss": 1.0},
        {"step": 3},
        {"step": 3, "loss": "1.0"},
        {"step": 3, "loss": float("nan")},
        {"step": 3, "loss": float("inf")},
    ],
)
def test_untrusted_reports_without_a_usable_point_are_ignored(report: object) -> None:
    assert point_from_report(report) is None  # type: ignore[arg-type]


def test_a_report_becomes_a_point() -> None:
    p = point_from_report({"step": 7, "loss": 1.25, "learningRate": 2e-5, "epoch": 0.5, "eta": "0:01:00"})
    assert p == LossPoint(step=7, loss=1.25, learning_rate=2e-5, epoch=0.5)


def test_status_round_trip_is_camel_case_and_skips_malformed_entries() -> None:
    h = downsample(curve(5))
    raw = to_status(h)
    assert raw[0] == {"step": 1, "loss": h[0].loss, "learningRate": 1e-4, "samples": 1}
    assert parse_history([*raw, {"step": "x"}, 3, {"step": 9, "bogus": 1}]) == h
