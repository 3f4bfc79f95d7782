"""``ftctl run --local`` handlers of the ``eval`` and ``publish`` steps, with the promotion gate between them.

``eval`` calls the worker's :func:`~finetune_operator.worker.evaluate.run_eval` (as the eval pod does) and then
decides the gate (:func:`finetune_operator.promotion.decide`) against the metrics of the last local model that
passed it (``<workdir>/.finetune/<job>/promoted.json``, the local stand-in for the serving model's
``status.outputs.metrics``). A failing gate raises :class:`~finetune_operator.errors.GateFailed`: the run
stops before publish and serve, so nothing is published or served.

``publish`` runs ``ftctl worker publish`` as a child process, like the publish pod: online (``huggingface_hub``
reads ``HF_HUB_OFFLINE`` once, at import), with the credentials from ``--secrets-dir`` in its environment only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune_operator.errors import GateFailed, PublishError, WorkerError
from finetune_operator.local.steps import LocalRun, StepOutcome, fail_with_log, local_step, tail
from finetune_operator.render.plan import Step

#: Metrics of the last local model that passed the gate.
PROMOTED_FILE = "promoted.json"


@local_step("eval")
def _eval(step: Step, run: LocalRun) -> StepOutcome:
    from finetune_operator.worker.evaluate import run_eval
    from finetune_operator.worker.train import load_config

    log_file = run.log_dir / "eval.log"
    with run.console.status("evaluate"), log_file.open("a", encoding="utf-8") as echo:
        try:
            res = run_eval(load_config(run.config_dir / "eval.yaml"), environ=run.env(run.base_env, 1), echo=echo)
        except WorkerError:
            fail_with_log(run, "evaluation", log_file)
            raise
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(res.metrics.items()))
    run.console.print(f"  eval: {shown} ({'evaluated' if res.ran else 'already complete'})", highlight=False)
    if res.predictions:
        run.console.print(f"  predictions: {res.predictions}")
    summary: dict[str, Any] = {"metrics": res.metrics, "predictions": res.predictions, "ran": res.ran}
    gate = _gate(run, res.metrics)
    if gate is not None:
        summary["gate"] = gate
    return StepOutcome(summary=summary)


def _gate(run: LocalRun, metrics: dict[str, float]) -> dict[str, Any] | None:
    from finetune_operator.promotion import decide
    from finetune_operator.worker.markers import read_marker

    gate = run.job.spec.gate
    if gate is None:
        return None
    promoted = read_marker(run.config_dir.parent, PROMOTED_FILE) or {}
    decision = decide(gate, metrics, promoted.get("metrics") or {})
    if not decision.passed:
        run.console.print(f"[red]gate failed[/red]: {decision.message}", highlight=False)
        raise GateFailed(f"GateFailed: {decision.message}")
    run.console.print(f"  gate passed: {decision.message}", highlight=False)
    return decision.status(gate.metric).model_dump(mode="json", by_alias=True, exclude_none=True)


@local_step("publish")
def _publish(step: Step, run: LocalRun) -> StepOutcome:
    from finetune_operator.worker.process import run_child
    from finetune_operator.worker.publish import load_config

    env = {k: v for k, v in run.env(run.base_env, 1).items() if k != "HF_HUB_OFFLINE"}
    env.update(run.secrets_env)
    ftctl = Path(sys.executable).parent / "ftctl"
    head = [str(ftctl)] if ftctl.is_file() else [sys.executable, "-c", "from finetune_operator.cli import run; run()"]
    config = run.config_dir / "publish.yaml"
    log_file = run.log_dir / "publish.log"
    with run.console.status("publish"):
        result = run_child([*head, "worker", "publish", "--config", str(config)], env, log_file=log_file)
    if result.returncode != 0:
        run.console.print(f"[red]publish failed[/red]; last lines of {log_file}:")
        run.console.print(tail(log_file), markup=False, highlight=False)
        error = next((line for line in reversed(result.tail) if line.startswith("error: ")), "publish failed")
        raise PublishError(error.removeprefix("error: publish failed: "))
    recorded = json.loads(Path(str(load_config(config)["resultFile"])).read_text(encoding="utf-8"))
    published = []
    for d in recorded["destinations"]:
        run.console.print(f"  published {d['name']}: {d['url']} ({d['uploaded']} uploaded, {d['skipped']} unchanged)")
        published.append({k: d[k] for k in ("name", "type", "url", "digest") if d.get(k)})
    return StepOutcome(summary={"published": published})
