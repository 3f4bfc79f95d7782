"""``ftctl worker eval``: evaluate the candidate model with LLaMA-Factory and fold the metrics into one file.

Runs (see :mod:`finetune_operator.render.evaluation`): ``loss`` (``do_eval``), ``predict`` (``do_predict``
with generation: BLEU-4/ROUGE and ``generated_predictions.jsonl``) and ``benchmark`` (LLaMA-Factory's
multiple-choice evaluator, ``llamafactory.eval.evaluator``: the 0.9.5 CLI refuses ``eval`` but keeps it).
Each run's LLaMA-Factory config is written into ``eval/.configs/`` (the mounted ConfigMap holds the whole
evaluation as one file) and run as a child process with the same signal handling as training.

The result, ``eval/metrics.json`` (``{"metrics": {...}, "predictions": path}``), is written last and doubles
as the completion marker: a re-run finds it and does nothing. The metrics also go into
``finetune-lineage.json`` next to the model, and (in a pod) into the termination message as one JSON line
(``{"metrics": ...}``), which is where the operator reads them: workers can patch ``status.reported`` but
not the termination message of another pod, and a pod's own message is written by our worker code only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from finetune_operator.errors import EvaluationError, TrainingError, WorkerError
from finetune_operator.worker import lineage, markers
from finetune_operator.worker.process import child_path, diagnose, lf_command, run_child
from finetune_operator.worker.train import Interrupted

log = logging.getLogger("finetune_operator.worker.evaluate")

#: LLaMA-Factory's benchmark categories (``results.log`` lines ``<Category>: <accuracy %>``).
_SCORE_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z ]*):\s*([0-9.]+)\s*$")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: str | None
    ran: bool


def _numbers(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"LLaMA-Factory wrote no readable {path.name}: {exc}") from None
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def benchmark_metrics(results_log: Path) -> dict[str, float]:
    """``benchmark_<category>`` (accuracy in %) from the evaluator's ``results.log``."""
    out: dict[str, float] = {}
    for line in results_log.read_text(encoding="utf-8").splitlines():
        m = _SCORE_LINE.match(line)
        if m:
            out["benchmark_" + m.group(1).strip().lower().replace(" ", "_")] = float(m.group(2))
    if "benchmark_average" not in out:
        raise EvaluationError(f"{results_log} has no Average score")
    return out


def _run_one(
    name: str, cfg: Mapping[str, Any], work: Path, env: dict[str, str], echo: IO[str] | None
) -> dict[str, float]:
    path = work / ".configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=True), encoding="utf-8")
    if name == "benchmark":
        save_dir = Path(str(cfg["save_dir"]))
        shutil.rmtree(save_dir, ignore_errors=True)  # LLaMA-Factory refuses an existing save_dir
        # LLaMA-Factory 0.9.5's CLI refuses ``eval`` ("will be deprecated") but keeps the evaluator itself.
        argv = [sys.executable, "-c", "from llamafactory.eval.evaluator import run_eval; run_eval()", str(path)]
    else:
        argv = lf_command("train", str(path))
    result = run_child(argv, env, echo=echo, log_file=work / f"{name}.log")
    if result.signal is not None:
        raise Interrupted(result.signal)
    if result.returncode != 0:
        err = diagnose(result, f"evaluation ({name})")
        # Out of memory and bad data keep their own exit codes; anything else is the evaluation's failure.
        raise EvaluationError(str(err)) if type(err) in (WorkerError, TrainingError) else err
    if name == "benchmark":
        return benchmark_metrics(Path(str(cfg["save_dir"])) / "results.log")
    return _numbers(Path(str(cfg["output_dir"])) / "all_results.json")


def run_eval(
    config: Mapping[str, Any], *, environ: Mapping[str, str] | None = None, echo: IO[str] | None = None
) -> EvalResult:
    """Evaluate (see the module docstring). Raises :class:`WorkerError` subclasses."""
    out = Path(str(config["outputDir"]))
    metrics_file = Path(str(config["metricsFile"]))
    done = markers.read_marker(metrics_file.parent, metrics_file.name)
    if done is not None and isinstance(done.get("metrics"), dict):
        log.info("evaluation %s is already complete: nothing to do", out)
        return EvalResult(metrics=dict(done["metrics"]), predictions=done.get("predictions"), ran=False)
    env = dict(os.environ if environ is None else environ)
    env["PATH"] = child_path(env)
    env.pop("FORCE_TORCHRUN", None)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    metrics: dict[str, float] = {}
    predictions: str | None = None
    for name, cfg in (config.get("runs") or {}).items():
        log.info("evaluation run %s", name)
        metrics.update(_run_one(name, cfg, out, env, echo))
        if name == "predict":
            file = Path(str(cfg["output_dir"])) / "generated_predictions.jsonl"
            predictions = str(file) if file.is_file() else None
    metrics = {
        k: v
        for k, v in metrics.items()
        if not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "epoch"))
    }
    summary = {
        "metrics": metrics,
        "predictions": predictions,
        "wallSeconds": round(time.time() - started, 3),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if config.get("lineage") is not None and config.get("modelDir"):
        doc = lineage.build_lineage(config["lineage"], metrics=metrics)
        lineage.write_lineage(str(config["modelDir"]), doc)
    markers.write_json_atomic(metrics_file, summary)
    return EvalResult(metrics=metrics, predictions=predictions, ran=True)
