"""What ``ftctl run --local`` does for each kind of step of the rendered plan: a registry, one entry per kind.

Why a registry and not a walk over ``spec.stages``: the plan (:func:`finetune_operator.render.render`) is the
one list of steps the operator, ``ftctl render`` and local runs share. A local run that walked the spec itself
would silently skip any kind of step it was not taught about (a preflight check, an evaluation, a publish),
and a local run that "succeeded" without running a step is worse than one that fails. So the runner iterates
``plan.steps``, looks each step's ``kind`` up here, and refuses the whole run up front
(:class:`UnknownStepKind`) when a kind has no entry. A test checks that every kind of
:data:`finetune_operator.render.plan.StepKind` is registered.

Adding a kind of step is one registration::

    @local_step("eval")
    def _eval(step: Step, run: LocalRun) -> StepOutcome:
        ...                                   # call the same worker function the pod's ``ftctl worker`` calls
        return StepOutcome(summary={...}, ran=True)

A handler gets the step and the :class:`LocalRun` (configs, logs, environment, console), calls the worker
function a pod would call, prints one line about what it did and returns what ``outputs.json`` records for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import FineTuneError, WorkerError
from finetune_operator.render import paths
from finetune_operator.render.plan import PathResolver, Plan, Step


class UnknownStepKind(FineTuneError):
    """The plan has a step whose kind ``ftctl run --local`` does not know how to run."""

    def __init__(self, step: Step) -> None:
        self.step = step
        known = ", ".join(sorted(STEP_RUNNERS))
        super().__init__(
            f"step {step.name!r} is of kind {step.kind!r}, which ftctl run --local cannot run (known kinds: {known})"
        )


@dataclass
class LocalRun:
    """Everything a step handler needs, built once per local run by the runner."""

    job: FineTuneJob
    resolver: PathResolver
    config_dir: Path
    log_dir: Path
    #: The environment steps start from (the process environment, or ``LocalOptions.environ``).
    base_env: Mapping[str, str]
    console: Console
    #: Builds a step's environment: ``env(base_env, nproc)`` (the runner's, so the rendezvous port and the
    #: removal of cluster variables are handled in one place).
    env: Callable[[Mapping[str, str], int], dict[str, str]]
    #: Training processes per stage (``--nproc``).
    nproc: int = 1
    #: Extra ``key=value`` overrides for training stages (``--smoke``).
    overrides: tuple[str, ...] = ()
    #: Values of the ``secretKeyRef`` variables of the publish step, from ``--secrets-dir``.
    secrets_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutcome:
    """What a step handler reports: ``summary`` goes into ``outputs.json`` under the step's name (None: nothing
    to record); ``deferred`` says the step was handed to a later phase instead of run (serving)."""

    summary: dict[str, Any] | None = None
    deferred: bool = False


StepRunner = Callable[[Step, LocalRun], StepOutcome]

#: kind -> handler. Register with :func:`local_step`.
STEP_RUNNERS: dict[str, StepRunner] = {}


def local_step(kind: str) -> Callable[[StepRunner], StepRunner]:
    """Register the local handler of steps of ``kind`` (one per kind)."""

    def register(fn: StepRunner) -> StepRunner:
        if kind in STEP_RUNNERS:
            raise ValueError(f"a local handler for step kind {kind!r} is already registered")
        STEP_RUNNERS[kind] = fn
        return fn

    return register


def check_plan(plan: Plan) -> None:
    """Raise :class:`UnknownStepKind` for the first step nothing is registered for (before anything runs)."""
    for step in plan.steps:
        if step.kind not in STEP_RUNNERS:
            raise UnknownStepKind(step)


def run_step(step: Step, run: LocalRun) -> StepOutcome:
    """Run one step with its registered handler."""
    runner = STEP_RUNNERS.get(step.kind)
    if runner is None:
        raise UnknownStepKind(step)
    return runner(step, run)


def fail_with_log(run: LocalRun, what: str, log_file: Path) -> None:
    """Print the tail of a failed step's log (the caller re-raises)."""
    run.console.print(f"[red]{what} failed[/red]; last lines of {log_file}:")
    run.console.print(tail(log_file), markup=False, highlight=False)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def fmt_loss(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


# ---------------------------------------------------------------------------------------------- the kinds


@local_step("download")
def _download(step: Step, run: LocalRun) -> StepOutcome:
    from finetune_operator.worker.download import run_download

    model = run.job.spec.model
    if not model.source:  # the renderer only plans a download with a source; a plan without one is a bug
        raise FineTuneError(f"step {step.name!r}: download planned without spec.model.source")
    with run.console.status(f"download {model.source}"):
        dl = run_download(
            source=model.source,
            model_dir=paths.model_dir(run.job, run.resolver),
            hub=model.hub,
            revision=model.revision,
            environ=dict(run.base_env),
        )
    run.console.print(f"download: {dl.model_dir} ({'fetched' if dl.ran else 'already complete'})")
    return StepOutcome(summary=None)


@local_step("preflight")
def _preflight(step: Step, run: LocalRun) -> StepOutcome:
    """The pod's check with local folders: memory, data, steps; refuses (exit 3/12) under ``Enforce``."""
    from finetune_operator.estimate.report import to_text
    from finetune_operator.worker.preflight import enforce, outcome, plan_status, run_preflight

    with run.console.status("preflight: memory estimate and data check"):
        result = run_preflight(run.job, run.resolver)
    run.console.print(to_text(result.plans).rstrip(), markup=False, highlight=False)
    for note in result.notes:
        run.console.print(f"  note: {note}", markup=False, highlight=False)
    warning = enforce(result, run.job.spec.preflight.mode)  # raises the refusal under Enforce
    reason, _ = outcome(result)
    if warning:
        run.console.print(f"[yellow]preflight warning:[/yellow] {warning}", highlight=False)
    run.console.print(f"preflight: {reason or 'ok'}")
    return StepOutcome(summary={"plan": plan_status(result)})


@local_step("train")
def _train(step: Step, run: LocalRun) -> StepOutcome:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from finetune_operator.worker import progress as wprogress
    from finetune_operator.worker.train import run_train

    stage = next(s for s in run.job.spec.stages if s.name == step.name)
    env = run.env(run.base_env, run.nproc)
    log_file = run.log_dir / f"{stage.name}.log"
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=run.console,
        transient=False,
    ) as bar:
        task = bar.add_task(f"{stage.name} ({stage.type}, {stage.method})", total=None, loss="-")

        def update(p: wprogress.Progress, _task: Any = task, _bar: Progress = bar) -> None:
            _bar.update(_task, completed=p.step, total=p.total_steps, loss=fmt_loss(p.loss))

        try:
            res = run_train(
                run.config_dir / f"{stage.name}.yaml",
                backend="local",
                stage=stage.name,
                environ=env,
                overrides=list(run.overrides),
                on_progress=update,
                log_file=log_file,
                report_status=False,
            )
        except WorkerError:
            fail_with_log(run, f"stage {stage.name}", log_file)
            raise
        if not res.ran:
            bar.update(task, completed=1, total=1, loss=fmt_loss(res.summary.get("finalLoss")))
    run.console.print(
        f"  {stage.name}: {res.output_dir} ({'trained' if res.ran else 'already complete'}, "
        f"final loss {fmt_loss(res.summary.get('finalLoss'))})"
    )
    return StepOutcome(summary={"outputDir": str(res.output_dir), "ran": res.ran, **res.summary})


@local_step("merge")
def _merge(step: Step, run: LocalRun) -> StepOutcome:
    from finetune_operator.worker.merge import run_merge

    log_file = run.log_dir / "merge.log"
    with run.console.status("merge (llamafactory-cli export)"):
        try:
            mr = run_merge(run.config_dir / "merge.yaml", environ=run.env(run.base_env, 1), log_file=log_file)
        except WorkerError:
            fail_with_log(run, "merge", log_file)
            raise
    run.console.print(f"  merge: {mr.export_dir} ({'merged' if mr.ran else 'already complete'})")
    return StepOutcome(summary={"outputDir": str(mr.export_dir), "ran": mr.ran, **mr.summary})


@local_step("serve")
def _serve(step: Step, run: LocalRun) -> StepOutcome:
    # Serving is the hand-off after the pipeline (it runs until interrupted): ``ftctl run`` starts it with
    # :func:`finetune_operator.local.runner.serve_local` once outputs.json is written, unless --no-serve.
    return StepOutcome(deferred=True)


# The evaluation and publish kinds live in their own module (it registers them on import).
from finetune_operator.local import evaluation as _evaluation  # noqa: E402, F401
