"""``ftctl worker train``: one LLaMA-Factory training stage, resumable and idempotent.

1. A stage whose output folder has the completion marker is done: exit 0 without touching anything (a retried
   pod, a re-run of ``ftctl run --local``).
2. Check inputs before paying for a launch: the model (and earlier adapters, and the tokenizer) and every
   dataset file of the stage (every row parses, the named columns exist: :mod:`.inputcheck`), with errors that
   name the file and line (exit 3 bad data, 4 missing model).
3. Resume: LLaMA-Factory resumes from the last ``checkpoint-*`` of ``output_dir`` by itself when
   ``overwrite_output_dir`` is false. Checkpoints cut short by a kill (no ``trainer_state.json``) are moved aside
   so that the resume starts from the last *complete* one; an output folder with leftovers but no checkpoint
   (killed before the first save) would make LLaMA-Factory refuse to start, so the run then overwrites it.
   A last checkpoint that already holds the end of training (killed after it, before the final save) is not
   resumed: the Trainer checks ``max_steps`` only after a step, so it would train one step too many. The
   worker finishes the stage from that checkpoint instead (:func:`final_checkpoint`).
4. Launch LLaMA-Factory's training (through :mod:`.lfentry`, which adds the checkpoint callback) with the
   backend's distributed environment (:mod:`.envmap`; a ``ppo`` stage also gets the trl its trainer needs,
   :mod:`.ppo_runtime`), follow progress (:mod:`.progress`). On SIGTERM the trainer saves a checkpoint at the
   next step boundary and exits (:mod:`.preempt`); the signal is forwarded to the process group only when that
   does not finish within the pod's grace period.
5. Rank 0 writes ``.finetune-complete.json`` with a summary (final loss, steps, runtime).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from finetune_operator.errors import DataError, ModelNotFoundError, WorkerError
from finetune_operator.worker import envmap, inputcheck, markers, ppo_runtime, preempt, stopping
from finetune_operator.worker.process import ChildResult, GracefulStop, check_file, child_path, diagnose, run_child
from finetune_operator.worker.progress import TRAINER_LOG, Progress, ProgressMonitor, StatusReporter

log = logging.getLogger("finetune_operator.worker.train")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: Files of a checkpoint that only a resuming Trainer reads; a finished stage's folder does not carry them.
_RESUME_ONLY = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")
#: Any of these makes a checkpoint hold the trained weights (adapters, or a full model, possibly sharded).
_WEIGHTS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class Interrupted(WorkerError):
    """The worker was asked to stop (SIGTERM/SIGINT) and stopped its training; a re-run resumes."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}; the next run resumes from the last checkpoint")
        self.exit_code = 128 + signum


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A LLaMA-Factory YAML config as a dict."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkerError(f"cannot read config {path}: {exc.strerror}") from exc
    if not isinstance(data, dict):
        raise WorkerError(f"config {path} is not a YAML mapping")
    return data


def checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder, in step order."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint the Trainer can resume from: its state file is written last."""
    return (path / "trainer_state.json").is_file()


def final_checkpoint(output_dir: Path) -> Path | None:
    """The last complete checkpoint when it already is the end of training (``global_step >= max_steps``, as
    its ``trainer_state.json`` says) and holds the weights; None otherwise (resume, or start)."""
    complete = [p for _, p in checkpoints(output_dir) if is_complete_checkpoint(p)]
    if not complete:
        return None
    last = complete[-1]
    try:
        state = json.loads((last / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step, total = state.get("global_step"), state.get("max_steps")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0 or step < total:
        return None
    return last if any((last / name).is_file() for name in _WEIGHTS) else None


def finish_from_checkpoint(checkpoint: Path, output_dir: Path) -> None:
    """Make ``output_dir`` what the final save would have made of it: the checkpoint's weights, tokenizer,
    configs and trainer state, without the optimizer and RNG states. Each file is copied under a temporary name
    and renamed, and the completion marker is written after all of them, so a kill here is simply redone."""
    for path in sorted(checkpoint.iterdir()):
        if not path.is_file() or _RESUME_ONLY.match(path.name):
            continue
        partial = output_dir / f".{path.name}.partial"
        shutil.copy2(path, partial)
        os.replace(partial, output_dir / path.name)


def _is_model_dir(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() or (p / "adapter_config.json").is_file()


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """Raise ModelNotFoundError / DataError for inputs that are not there (before launching anything)."""
    model = str(cfg.get("model_name_or_path", ""))
    if not model:
        raise ModelNotFoundError("the config has no model_name_or_path")
    if os.path.isabs(model) and not _is_model_dir(model):
        raise ModelNotFoundError(
            f"base model not found: {model} has no config.json (download it first, or fix spec.model.volume)"
        )
    if os.path.isabs(model):
        inputcheck.check_tokenizer(Path(model))
    for adapter in str(cfg.get("adapter_name_or_path") or "").split(","):
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"adapter of an earlier stage not found: {adapter} has no adapter_config.json")
    reward = str(cfg.get("reward_model") or "")  # ppo: an rm stage's output or a model on a volume
    if os.path.isabs(reward) and not _is_model_dir(reward):
        raise ModelNotFoundError(f"reward model not found: {reward} has no config.json or adapter_config.json")
    names = [n.strip() for n in str(cfg.get("dataset") or "").split(",") if n.strip()]
    if not names:
        return
    dataset_dir = str(cfg.get("dataset_dir", "data"))
    info_path = Path(dataset_dir) / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read {info_path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise DataError(f"{info_path} is not valid JSON: {exc}") from exc
    for name in names:
        entry = info.get(name)
        if not isinstance(entry, dict):
            raise DataError(f"dataset {name!r} is not described in {info_path}")
        file_name = entry.get("file_name")
        if not file_name:
            continue  # hub datasets (hf_hub_url, ...) are LLaMA-Factory's business
        path = check_file(os.path.join(dataset_dir, str(file_name)), f"dataset {name!r}")
        if path.is_file():
            inputcheck.check_dataset_file(path, name, entry)


def resume_overrides(cfg: Mapping[str, Any], output_dir: Path, *, primary: bool) -> list[str]:
    """Command-line overrides that make a restarted stage resume (or start cleanly). See the module docstring."""
    if cfg.get("resume_from_checkpoint"):
        return []
    if primary:
        for _step, path in checkpoints(output_dir):
            if not is_complete_checkpoint(path):
                aside = path.with_name(f".incomplete-{path.name}-{int(time.time())}")
                log.warning("checkpoint %s is incomplete (killed while saving): moving it to %s", path, aside.name)
                path.rename(aside)
    complete = [p for _, p in checkpoints(output_dir) if is_complete_checkpoint(p)]
    if complete:
        log.info("resuming from %s", complete[-1])
        return ["overwrite_output_dir=false"] if cfg.get("overwrite_output_dir") else []
    if output_dir.is_dir() and any(not p.name.startswith(".") for p in output_dir.iterdir()):
        log.info("%s holds leftovers of an interrupted run without a checkpoint: starting over", output_dir)
        return ["overwrite_output_dir=true"]
    return []


def summarize(output_dir: Path, started: float, last: Progress | None) -> dict[str, Any]:
    """The completion marker's summary, from LLaMA-Factory's result files."""
    results: dict[str, Any] = {}
    for name in ("all_results.json", "train_results.json"):
        try:
            results = json.loads((output_dir / name).read_text(encoding="utf-8"))
            break
        except (OSError, ValueError):
            continue
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))
    final_loss = last.loss if last is not None else None
    if final_loss is None:
        losses = [h["loss"] for h in state.get("log_history", []) if isinstance(h, dict) and "loss" in h]
        final_loss = losses[-1] if losses else None
    return {
        "finalLoss": final_loss,
        "trainLoss": results.get("train_loss"),
        "steps": state.get("global_step", last.step if last else None),
        "totalSteps": state.get("max_steps", last.total_steps if last else None),
        "epoch": results.get("epoch", state.get("epoch")),
        "trainRuntime": results.get("train_runtime"),
        "wallSeconds": round(time.time() - started, 3),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class TrainResult:
    """What :func:`run_train` did."""

    output_dir: Path
    summary: dict[str, Any]
    #: False when the stage was already complete and nothing ran.
    ran: bool
    primary: bool


def _uses_deepspeed(cfg: Mapping[str, Any]) -> bool:
    return bool(cfg.get("deepspeed"))


def run_train(
    config: str | os.PathLike[str],
    *,
    backend: str = "job",
    stage: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    on_progress: Callable[[Progress], None] | None = None,
    echo: IO[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    report_status: bool = True,
    on_start: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Run one training stage (see the module docstring). Raises :class:`WorkerError` subclasses."""
    env_in = dict(os.environ if environ is None else environ)
    cfg_path = Path(config)
    cfg = load_config(cfg_path)
    output_dir = Path(str(cfg.get("output_dir") or ""))
    if not str(output_dir) or str(output_dir) == ".":
        raise WorkerError(f"config {cfg_path} has no output_dir")
    stage = stage or env_in.get("FT_STAGE") or output_dir.name
    done = markers.read_marker(output_dir)
    if done is not None:
        log.info("stage %s is already complete (%s): nothing to do", stage, output_dir / markers.COMPLETE)
        return TrainResult(output_dir=output_dir, summary=done, ran=False, primary=True)

    launch = envmap.plan_launch(backend, env_in, force_torchrun=_uses_deepspeed(cfg))
    check_inputs(cfg)
    # LLaMA-Factory's PPO needs its own trl (ppo_runtime): a missing one is reported before anything starts.
    stage_env = ppo_runtime.stage_env(env_in) if cfg.get("stage") == "ppo" else {}
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = resume_overrides(cfg, output_dir, primary=launch.primary)
    final = None if cfg.get("resume_from_checkpoint") else final_checkpoint(output_dir)
    if final is not None:
        return _finish(final, output_dir, stage, backend, launch, env_in)

    env = envmap.apply_env(env_in, launch.env)
    env.update(stage_env)
    env["PATH"] = child_path(env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # One entry point for every mode: in "direct" mode (an outer launcher, DeepSpeed's, made this process one
    # rank) FORCE_TORCHRUN is absent and it trains in place; in "torchrun" mode it starts torchrun itself.
    argv = [sys.executable, "-m", "finetune_operator.worker.lfentry", str(cfg_path), *extra, *overrides]
    log.info(
        "stage %s: %s launch, %d node(s) x %d process(es), node rank %d%s",
        stage,
        launch.mode,
        launch.nnodes,
        launch.nproc_per_node,
        launch.node_rank,
        f", master {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}" if launch.mode == "torchrun" else "",
    )

    callbacks: list[Callable[[Progress], None]] = []
    reporter = StatusReporter.from_env(stage, env_in) if (launch.primary and report_status) else None
    if launch.primary:
        callbacks.append(lambda p: log.info(p.line(stage)))
        if reporter is not None:
            rep = reporter

            def _report(p: Progress) -> None:
                rep.report(p)

            callbacks.append(_report)
        if on_progress is not None:
            callbacks.append(on_progress)
    started = time.time()
    poll = env_in.get("FT_PROGRESS_POLL")
    monitor = ProgressMonitor(output_dir, callbacks, poll_interval=float(poll) if poll else None)
    with contextlib.ExitStack() as stack:
        control_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-control-"))
        env[preempt.CONTROL_DIR_ENV] = control_dir
        control = preempt.Control(Path(control_dir))
        graceful = None
        if preempt.enabled(env_in):

            def _request() -> bool:
                if not control.training_started():
                    return False  # nothing to save yet: stop now
                log.warning("stage %s: stop requested; the trainer saves a checkpoint at the next step", stage)
                control.request_stop()
                return True

            graceful = GracefulStop(request=_request, deadline=preempt.stop_deadline(env_in))
            stack.enter_context(stopping.announced(env_in))
        with monitor:
            result: ChildResult = run_child(
                argv, env, echo=echo, log_file=log_file, on_start=on_start, graceful=graceful
            )
        saved_at = control.preempted_step()
    if saved_at is not None:
        log.warning("stage %s: checkpoint-%d saved on preemption", stage, saved_at)
    last = monitor.follower.last
    if reporter is not None:
        if result.returncode == 0 and last is not None:
            reporter.report(last, force=True)
        else:
            reporter.flush()
    if result.signal is not None:
        raise Interrupted(result.signal)
    if result.returncode != 0:
        raise diagnose(result, f"training stage {stage!r}")
    summary = summarize(output_dir, started, last)
    if launch.primary:
        if not (output_dir / TRAINER_LOG).exists() and not any(output_dir.glob("*.safetensors")):
            raise WorkerError(f"training stage {stage!r} exited 0 but wrote nothing to {output_dir}")
        _complete(output_dir, stage, summary, backend, launch, env_in)
    return TrainResult(output_dir=output_dir, summary=summary, ran=True, primary=launch.primary)


def _finish(
    checkpoint: Path, output_dir: Path, stage: str, backend: str, launch: envmap.Launch, env_in: Mapping[str, str]
) -> TrainResult:
    """The stage's training is over (its last checkpoint says so): finish it without launching anything."""
    started = time.time()
    log.info("stage %s: %s is the end of training: finishing from it without training again", stage, checkpoint)
    if not launch.primary:  # every node sees the same checkpoint on the shared volume; rank 0 finishes
        return TrainResult(output_dir=output_dir, summary={}, ran=False, primary=False)
    finish_from_checkpoint(checkpoint, output_dir)
    summary = summarize(output_dir, started, None)
    _complete(output_dir, stage, summary, backend, launch, env_in)
    return TrainResult(output_dir=output_dir, summary=summary, ran=True, primary=True)


def _complete(
    output_dir: Path,
    stage: str,
    summary: dict[str, Any],
    backend: str,
    launch: envmap.Launch,
    env_in: Mapping[str, str],
) -> None:
    """Rank 0 writes the completion marker: the summary and which process wrote it."""
    summary["writer"] = {
        "backend": backend,
        "nodeRank": launch.node_rank,
        "nnodes": launch.nnodes,
        "nprocPerNode": launch.nproc_per_node,
        "host": env_in.get("HOSTNAME", ""),
    }
    markers.write_marker(output_dir, {"stage": stage, **summary})
    log.info("stage %s complete: %s", stage, json.dumps(summary, sort_keys=True))


def clean_stage(output_dir: str | os.PathLike[str]) -> None:
    """Remove a stage's outputs (used by ``ftctl run --local --fresh``)."""
    shutil.rmtree(output_dir, ignore_errors=True)
