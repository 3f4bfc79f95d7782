"""``ftctl run --local``: every stage of a FineTuneJob as local processes, with the pods' worker code.

The pipeline is the one the operator runs, minus Kubernetes: the renderer's config files
(:func:`finetune_operator.render.config_files`) are generated with a :class:`PathResolver` whose claim roots are
local folders (``<workdir>/<claim>`` unless ``--volume CLAIM=DIR``), written to
``<workdir>/.finetune/<job>/config`` (what ``/etc/finetune`` holds in pods), and the steps of the rendered
plan run in plan order, each through the handler registered for its kind in :mod:`finetune_operator.local.steps`,
which calls the same worker function a pod's ``ftctl worker <step>`` calls. So a spec that runs here runs on the
cluster with the same LLaMA-Factory configs, and the resume/no-op/marker behaviour is the same too: re-running a
finished local run does nothing; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from finetune_operator.api.types import FineTuneJob
from finetune_operator.local import evaluation as local_evaluation
from finetune_operator.local import secrets as local_secrets
from finetune_operator.local import steps
from finetune_operator.render import RenderOptions, config_files, evaluation, render
from finetune_operator.render.plan import PathResolver
from finetune_operator.worker.markers import write_json_atomic

#: Overrides of ``--smoke``: a couple of steps per stage, to check a spec end to end in seconds.
SMOKE_OVERRIDES: tuple[str, ...] = ("max_steps=2", "max_samples=16", "save_steps=1000", "logging_steps=1")


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
    #: Steps handed to a later phase instead of run (``serve``: :func:`serve_local`).
    deferred: tuple[str, ...] = ()
    #: The promotion gate's decision (None without a gate).
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
    """Run every step of ``job``'s rendered plan locally, in plan order, each with the handler registered for
    its kind (:mod:`finetune_operator.local.steps`). A plan with a kind of step that has no local handler is
    refused before anything runs (:class:`~finetune_operator.local.steps.UnknownStepKind`); a failed step raises
    its :class:`WorkerError`. Serving is deferred: the result says whether the plan has a serve step, and
    ``ftctl run`` starts it with :func:`serve_local`."""
    console = console or Console(stderr=True)
    started = time.time()
    resolver = resolver_for(job, opts)
    plan = render(job, RenderOptions(resolver=resolver))
    steps.check_plan(plan)
    # Credentials are resolved before the first step: a missing Secret must not surface after training.
    secrets_env = local_secrets.resolve(
        evaluation.publish_destinations(job)[1], opts.secrets_dir, field="spec.publish.destinations"
    )
    cfg_dir = write_configs(job, resolver)
    log_dir = cfg_dir.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{job.name}[/bold]: configs in {cfg_dir}, logs in {log_dir}")
    run = steps.LocalRun(
        job=job,
        resolver=resolver,
        config_dir=cfg_dir,
        log_dir=log_dir,
        base_env=dict(os.environ if opts.environ is None else opts.environ),
        console=console,
        env=_stage_env,
        nproc=opts.nproc or 1,
        overrides=SMOKE_OVERRIDES if opts.smoke else (),
        secrets_env=secrets_env,
    )
    summaries: dict[str, dict[str, Any]] = {}
    deferred: list[str] = []
    for step in plan.steps:
        outcome = steps.run_step(step, run)
        if outcome.deferred:
            deferred.append(step.name)
        elif outcome.summary is not None:
            summaries[step.name] = outcome.summary

    outputs = dict(plan.outputs)
    outputs.pop("endpoint", None)
    evaluated = summaries.get(evaluation.EVAL) or {}
    if "metrics" in evaluated:
        outputs["metrics"] = evaluated["metrics"]
    if "published" in (summaries.get(evaluation.PUBLISH) or {}):
        outputs["published"] = summaries[evaluation.PUBLISH]["published"]
    if job.spec.gate is not None:
        # The model that passed the gate is the "serving" one the next local run compares with.
        write_json_atomic(cfg_dir.parent / local_evaluation.PROMOTED_FILE, {"metrics": outputs.get("metrics", {})})
    # What status.outputs would say, with local paths: for scripts (and the serve hand-off) to read.
    write_json_atomic(cfg_dir.parent / "outputs.json", {"outputs": outputs, "stages": summaries})
    console.print("[bold green]done[/bold green] in %.1f s" % (time.time() - started))
    if outputs.get("adapters"):
        console.print("  adapters:     " + ", ".join(outputs["adapters"]))
    if outputs.get("mergedModel"):
        console.print(f"  merged model: {outputs['mergedModel']}")
    elif outputs.get("model"):
        console.print(f"  model:        {outputs['model']}")
    return LocalResult(
        config_dir=cfg_dir,
        outputs=outputs,
        stages=summaries,
        wall_seconds=time.time() - started,
        deferred=tuple(deferred),
        gate=evaluated.get("gate"),
    )


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


def parse_volumes(items: Sequence[str]) -> dict[str, str]:
    """``CLAIM=DIR`` items of ``--volume`` as a dict (ValueError names the bad item)."""
    out: dict[str, str] = {}
    for item in items:
        claim, sep, directory = item.partition("=")
        if not sep or not claim or not directory:
            raise ValueError(f"--volume {item!r}: expected CLAIM=DIR")
        out[claim] = directory
    return out
