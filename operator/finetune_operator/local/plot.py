"""The loss curve of a training stage as a PNG, from LLaMA-Factory's ``trainer_log.jsonl``.

LLaMA-Factory can plot by itself (``plot_loss: true``), but only at the end of a successful run and only into
the output folder; this works on any stage folder at any time (while training, after a resume, on a copy of a
PVC), which is when one wants to look at a curve.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_losses(stage_dir: str | os.PathLike[str]) -> list[tuple[int, float]]:
    """``(step, loss)`` pairs of the stage, last value per step (a resumed run logs some steps twice)."""
    path = Path(stage_dir) / "trainer_log.jsonl"
    by_step: dict[int, float] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"no trainer log in {stage_dir}: {exc.strerror}") from exc
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("current_steps"), int)
            and isinstance(rec.get("loss"), (int, float))
        ):
            by_step[rec["current_steps"]] = float(rec["loss"])
    return sorted(by_step.items())


def plot_loss(stage_dir: str | os.PathLike[str], out: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write the loss curve of ``stage_dir`` to ``out`` (PNG); returns the path."""
    points = read_losses(stage_dir)
    if not points:
        raise ValueError(f"{stage_dir}: the trainer log has no loss values yet")
    return plot_series({Path(stage_dir).name: points}, out, title or f"{Path(stage_dir).name}: training loss")


def plot_series(series: Mapping[str, Sequence[tuple[int, float]]], out: str | os.PathLike[str], title: str) -> Path:
    """Write one curve per named series of ``(step, loss)`` to ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for name, points in series.items():
            steps = [s for s, _ in points]
            losses = [v for _, v in points]
            ax.plot(steps, losses, marker="o" if len(points) < 50 else None, linewidth=1.5, label=name)
        if len(series) > 1:
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, format="png")
    finally:
        plt.close(fig)
    return target
