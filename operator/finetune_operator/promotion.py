"""The promotion gate's decision: pure, shared by the operator and ``ftctl run --local``.

Inputs are the gate (``spec.gate``), the candidate's metrics (from the evaluation step) and the metrics of
the model serving now (``status.outputs.metrics``; empty when nothing serves). The operator takes the
candidate's metrics from the evaluation pod's termination message, which only the worker writes, never
from the status that workers may patch.

Rules: with ``threshold`` the value must be at most (lower is better) / at least (higher is better) the
threshold; with ``noWorseThanServing`` it must be no worse than the serving value by more than ``margin``.
A missing metric fails the gate (an evaluation that did not produce the gated number proves nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from finetune_operator.api.types import GateSpec, GateStatus

#: Metric name fragments for which lower values are better (when ``higherIsBetter`` is not set).
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "runtime")


def higher_is_better(gate: GateSpec) -> bool:
    if gate.higher_is_better is not None:
        return gate.higher_is_better
    return not any(part in gate.metric.lower() for part in LOWER_IS_BETTER)


@dataclass(frozen=True)
class Decision:
    passed: bool
    value: float | None
    serving_value: float | None
    message: str

    def status(self, metric: str) -> GateStatus:
        return GateStatus(
            result="Passed" if self.passed else "Failed",
            metric=metric,
            value=self.value,
            serving_value=self.serving_value,
            message=self.message,
        )


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def decide(gate: GateSpec, metrics: Mapping[str, float], serving: Mapping[str, float] | None = None) -> Decision:
    """Apply ``gate`` to the candidate's ``metrics`` (see the module docstring)."""
    name = gate.metric
    value = metrics.get(name)
    if value is None or not isinstance(value, int | float) or math.isnan(float(value)):
        have = ", ".join(sorted(metrics)) or "none"
        return Decision(False, None, None, f"the evaluation did not report {name} (it reported: {have})")
    value = float(value)
    higher = higher_is_better(gate)
    word = "at least" if higher else "at most"
    reasons: list[str] = []
    failed = False
    if gate.threshold is not None:
        ok = value >= gate.threshold if higher else value <= gate.threshold
        failed |= not ok
        reasons.append(
            f"{name} {_fmt(value)} {'meets' if ok else 'misses'} the threshold ({word} {_fmt(gate.threshold)})"
        )
    serving_value: float | None = None
    if gate.no_worse_than_serving:
        raw = (serving or {}).get(name)
        if raw is None:
            reasons.append(f"no serving model with {name} to compare with")
        else:
            serving_value = float(raw)
            bound = serving_value - gate.margin if higher else serving_value + gate.margin
            ok = value >= bound if higher else value <= bound
            failed |= not ok
            reasons.append(
                f"{name} {_fmt(value)} is {'no worse than' if ok else 'worse than'} the serving model's "
                f"{_fmt(serving_value)} (margin {_fmt(gate.margin)})"
            )
    return Decision(not failed, value, serving_value, "; ".join(reasons))
