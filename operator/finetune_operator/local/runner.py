"""``ftctl run --local``: every stage of a FineTuneJob as local processes, with the pods' worker code.

The pipeline is the one the operator runs, minus Kubernetes: the renderer's config files
(:func:`finetune_operator.render.config_files`) are generated with a :class:`PathResolver` whose claim roots are
local folders (``<workdir>/<claim>`` unless ``--volume CLAIM=DIR``), written to
``<workdir>/.finetune/<job>/config`` (what ``/etc/finetune`` holds in pods), and each step calls the same worker
function a pod's ``ftctl worker <step>`` calls. So a spec that runs here runs on the cluster with the same
LLaMA-Factory configs, and the resume/no-op/marker behaviour is the same too: re-running a finished local run
does nothing; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import GateFailed, PublishError, WorkerError
from finetune_operator.local import secrets as local_secrets
from finetune_operator.render import RenderOptions, config_files, evaluation, paths, render
from finetune_operator.render import llamafactory as lf
from finetune_operator.render.plan import PathResolver
from finetune_operator.worker import progress as wprogress
from finetune_operator.worker.markers import write_json_atomic

#: Overrides of ``--smoke``: a couple of steps per stage, to check a spec end to end in seconds.
SMOKE_OVERRIDES = ("max_steps=2", "max_samples=16", "save_steps=1000", "logging_steps=1")


@dataclass
class LocalOptions:
    """Options of ``ftctl run --local``."""

    workdir: Path
    volumes: Mapping[str, str] = field(default_factory=dict)
    nproc: int | None = None
    vllm: str | None = None
    smoke: bool = False
    environ: Mapping[str, str] | None = None
    #: ``--secrets-dir``: ``DIR/<secret>/<key>`` (see :mod:`finetune_operator.local.secrets`).
    secrets_dir: Path | None = None


@dataclass
class LocalResult:
    """Where things are after a local run (the ``status.outputs`` shape, with local paths)."""

    config_dir: Path
    outputs: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    wall_seconds: float
    #: The gate's decision (None without a gate).
    gate: dict[str, Any] | None = None


def resolver_for(job: FineTuneJob, opts: LocalOptions) -> PathResolver:
    """Claims -> ``<workdir>/<claim>`` (or ``--volume`` folders); configs -> ``<workdir>/.finetune/<job>/config``."""
    root = opts.workdir.resolve()
    claims = {k: str(Path(v).resolve()) for k, v in opts.volumes.items()}
    return PathResolver(volume_root=str(root), config_dir=str(root / ".finetune" / job.name / "config"), claims=claims)


def write_configs(job: FineTuneJob, resolver: PathResolver) -> Path:
    """Write the generated config files (the ConfigMap's data) into the resolver's config dir."""
    cfg_dir = Path(resolver.config_dir)
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for name, text in config_files(job, resolver).items():
        (cfg_dir / name).write_text(text, encoding="utf-8")
    return cfg_dir


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage_env(base: Mapping[str, str], nproc: int) -> dict[str, str]:
    env = dict(base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["FT_NPROC_PER_NODE"] = str(nproc)
    # A local run never reports to a cluster, whatever the shell has exported.
    for k in ("FT_JOB_NAME", "FT_JOB_NAMESPACE", "FT_KUBE_API"):
        env.pop(k, None)
    if nproc > 1 or "MASTER_PORT" not in env:
        env["FT_MASTER_PORT"] = str(free_port())
    return env


def run_local(job: FineTuneJob, opts: LocalOptions, console: Console | None = None) -> LocalResult:
    """Run the whole pipeline of ``job`` locally; raises :class:`WorkerError` on the first failed step."""
    from finetune_operator.worker.download import run_download
    from finetune_operator.worker.merge import run_merge
    from finetune_operator.worker.train import run_train

    console = console or Console(stderr=True)
    started = time.time()
    resolver = resolver_for(job, opts)
    cfg_dir = write_configs(job, resolver)
    log_dir = cfg_dir.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if opts.environ is None else opts.environ)
    plan = render(job, RenderOptions(resolver=resolver))
    # Credentials are resolved before the first step: a missing Secret must not surface after training.
    publish_env = local_secrets.resolve(
        evaluation.publish_destinations(job)[1], opts.secrets_dir, field="spec.publish.destinations"
    )
    console.print(f"[bold]{job.name}[/bold]: configs in {cfg_dir}, logs in {log_dir}")
    stages: dict[str, dict[str, Any]] = {}

    model = job.spec.model
    if model.source:
        with console.status(f"download {model.source}"):
            dl = run_download(
                source=model.source,
                model_dir=paths.model_dir(job, resolver),
                hub=model.hub,
                revision=model.revision,
                environ=base_env,
            )
        console.print(f"download: {dl.model_dir} ({'fetched' if dl.ran else 'already complete'})")

    overrides = list(SMOKE_OVERRIDES) if opts.smoke else []
    for stage in job.spec.stages:
        nproc = opts.nproc or 1
        env = _stage_env(base_env, nproc)
        log_file = log_dir / f"{stage.name}.log"
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(f"{stage.name} ({stage.type}, {stage.method})", total=None, loss="-")

            def update(p: wprogress.Progress, _task: Any = task, _bar: Progress = bar) -> None:
                _bar.update(
                    _task, completed=p.step, total=p.total_steps, loss=f"{p.loss:.4f}" if p.loss is not None else "-"
                )

            try:
                res = run_train(
                    Path(cfg_dir) / f"{stage.name}.yaml",
                    backend="local",
                    stage=stage.name,
                    environ=env,
                    overrides=overrides,
                    on_progress=update,
                    log_file=log_file,
                    report_status=False,
                )
            except WorkerError:
                console.print(f"[red]stage {stage.name} failed[/red]; last lines of {log_file}:")
                console.print(_tail(log_file), markup=False, highlight=False)
                raise
            if not res.ran:
                bar.update(task, completed=1, total=1, loss=_fmt(res.summary.get("finalLoss")))
        stages[stage.name] = {"outputDir": str(res.output_dir), "ran": res.ran, **res.summary}
        console.print(
            f"  {stage.name}: {res.output_dir} ({'trained' if res.ran else 'already complete'}, "
            f"final loss {_fmt(res.summary.get('finalLoss'))})"
        )

    if (cfg_dir / "merge.yaml").exists() and lf.export_config(job, resolver) is not None:
        log_file = log_dir / "merge.log"
        with console.status("merge (llamafactory-cli export)"):
            try:
                mr = run_merge(cfg_dir / "merge.yaml", environ=_stage_env(base_env, 1), log_file=log_file)
            except WorkerError:
                console.print(f"[red]merge failed[/red]; last lines of {log_file}:")
                console.print(_tail(log_file), markup=False, highlight=False)
                raise
        stages["merge"] = {"outputDir": str(mr.export_dir), "ran": mr.ran, **mr.summary}
        console.print(f"  merge: {mr.export_dir} ({'merged' if mr.ran else 'already complete'})")

    outputs = dict(plan.outputs)
    outputs.pop("endpoint", None)
    gate: dict[str, Any] | None = None
    if job.spec.evaluate is not None:
        metrics = _evaluate(job, cfg_dir, log_dir, base_env, console)
        stages[evaluation.EVAL] = {"metrics": metrics}
        outputs["metrics"] = metrics
        gate = _gate(job, metrics, cfg_dir.parent, console)
    if job.spec.publish is not None:
        outputs["published"] = _publish(cfg_dir, {**base_env, **publish_env}, log_dir, console)
    if job.spec.gate is not None:
        # The model that passed the gate is the "serving" one the next local run compares with.
        write_json_atomic(cfg_dir.parent / PROMOTED_FILE, {"metrics": outputs.get("metrics", {})})
    # What status.outputs would say, with local paths: for scripts (and the serve hand-off) to read.
    write_json_atomic(cfg_dir.parent / "outputs.json", {"outputs": outputs, "stages": stages})
    console.print("[bold green]done[/bold green] in %.1f s" % (time.time() - started))
    if outputs.get("adapters"):
        console.print("  adapters:     " + ", ".join(outputs["adapters"]))
    if outputs.get("mergedModel"):
        console.print(f"  merged model: {outputs['mergedModel']}")
    elif outputs.get("model"):
        console.print(f"  model:        {outputs['model']}")
    return LocalResult(
        config_dir=cfg_dir, outputs=outputs, stages=stages, wall_seconds=time.time() - started, gate=gate
    )


#: Metrics of the last local model that passed the gate (the local stand-in for ``status.outputs.metrics``).
PROMOTED_FILE = "promoted.json"


def _evaluate(
    job: FineTuneJob, cfg_dir: Path, log_dir: Path, env: Mapping[str, str], console: Console
) -> dict[str, float]:
    from finetune_operator.worker.evaluate import run_eval
    from finetune_operator.worker.train import load_config

    with console.status("evaluate"), (log_dir / "eval.log").open("a", encoding="utf-8") as echo:
        res = run_eval(load_config(cfg_dir / "eval.yaml"), environ=_stage_env(env, 1), echo=echo)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(res.metrics.items()))
    console.print(f"  eval: {shown} ({'evaluated' if res.ran else 'already complete'})")
    if res.predictions:
        console.print(f"  predictions: {res.predictions}")
    return res.metrics


def _gate(job: FineTuneJob, metrics: Mapping[str, float], state_dir: Path, console: Console) -> dict[str, Any] | None:
    from finetune_operator.promotion import decide
    from finetune_operator.worker.markers import read_marker

    if job.spec.gate is None:
        return None
    promoted = read_marker(state_dir, PROMOTED_FILE) or {}
    decision = decide(job.spec.gate, metrics, promoted.get("metrics") or {})
    status = decision.status(job.spec.gate.metric).model_dump(mode="json", by_alias=True, exclude_none=True)
    if not decision.passed:
        console.print(f"[red]gate failed[/red]: {decision.message}", highlight=False)
        raise GateFailed(f"GateFailed: {decision.message}")
    console.print(f"  gate passed: {decision.message}", highlight=False)
    return status


def _publish(cfg_dir: Path, env: Mapping[str, str], log_dir: Path, console: Console) -> list[dict[str, Any]]:
    """``ftctl worker publish`` as a child process, like the publish pod: online (no ``HF_HUB_OFFLINE``, which
    ``huggingface_hub`` reads once at import), credentials in its environment only."""
    import sys

    from finetune_operator.worker.process import run_child
    from finetune_operator.worker.publish import load_config

    child_env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    ftctl = Path(sys.executable).parent / "ftctl"
    head = [str(ftctl)] if ftctl.is_file() else [sys.executable, "-c", "from finetune_operator.cli import run; run()"]
    log_file = log_dir / "publish.log"
    with console.status("publish"):
        result = run_child(
            [*head, "worker", "publish", "--config", str(cfg_dir / "publish.yaml")], child_env, log_file=log_file
        )
    if result.returncode != 0:
        console.print(f"[red]publish failed[/red]; last lines of {log_file}:")
        console.print(_tail(log_file), markup=False, highlight=False)
        error = next((line for line in reversed(result.tail) if line.startswith("error: ")), "publish failed")
        raise PublishError(error.removeprefix("error: publish failed: "))
    recorded = json.loads(Path(str(load_config(cfg_dir / "publish.yaml")["resultFile"])).read_text())
    for d in recorded["destinations"]:
        console.print(f"  published {d['name']}: {d['url']} ({d['uploaded']} uploaded, {d['skipped']} unchanged)")
    return [{k: d[k] for k in ("name", "type", "url", "digest") if d.get(k)} for d in recorded["destinations"]]


def serve_local(job: FineTuneJob, opts: LocalOptions, result: LocalResult, console: Console) -> int:
    """Hand off to vLLM like the operator does: start it with the Deployment's command line (local paths), or,
    when the local serve module is unavailable, print that command."""
    resolver = resolver_for(job, opts)
    try:
        from finetune_operator.local import serve as local_serve
    except ImportError:
        from finetune_operator.render.serve import vllm_command

        cmd = vllm_command(job, resolver, host="127.0.0.1")
        env = " ".join(f"{k}={v}" for k, v in cmd.env)
        console.print(f"serve: start vLLM with:\n  {env} vllm serve {' '.join(cmd.args)}")
        return 0
    kwargs: dict[str, Any] = {
        "smoke": opts.smoke,
        "console": console,
        "log_path": result.config_dir.parent / "logs" / "vllm.log",
    }
    if opts.vllm:
        kwargs["vllm_cmd"] = opts.vllm
    return int(local_serve.serve(job, resolver, result.outputs, **kwargs))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def parse_volumes(items: Sequence[str]) -> dict[str, str]:
    """``CLAIM=DIR`` items of ``--volume`` as a dict (ValueError names the bad item)."""
    out: dict[str, str] = {}
    for item in items:
        claim, sep, directory = item.partition("=")
        if not sep or not claim or not directory:
            raise ValueError(f"--volume {item!r}: expected CLAIM=DIR")
        out[claim] = directory
    return out
