"""Pre-flight: plan every stage of a FineTuneJob against the real volumes, before any GPU is requested.

One function serves the three places that run it: ``ftctl plan`` (local folders), ``ftctl run --local`` (its
first step) and the ``preflight`` pod of the operator (the volumes mounted read-only at ``/mnt/volumes``). It

* reads the base model's ``config.json`` (or the one in ``model_config``: a model that is still to be
  downloaded has no local copy yet);
* generates each stage's LLaMA-Factory config with the renderer (exactly what the training pod will get) and
  runs the data check on it (:mod:`.datacheck`) unless told not to or LLaMA-Factory is absent;
* asks the pure estimator (:mod:`finetune_operator.estimate`) for memory, verdict, steps and duration.

:func:`outcome` turns the plans into the operator's decision: ``WillNotFit`` when a stage's per-GPU peak
exceeds its GPU's memory, ``InvalidData`` when a dataset is unreadable or a stage has no valid sample.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.api.constants import Reason
from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import DataError, ModelNotFoundError, WillNotFitError
from finetune_operator.estimate.data import StageData
from finetune_operator.estimate.plan import NO_FIT, StagePlan, plan_job
from finetune_operator.estimate.shape import ModelShape, ShapeError, shape_from_config
from finetune_operator.render import llamafactory as lf
from finetune_operator.render import paths
from finetune_operator.render.dump import to_json
from finetune_operator.render.plan import PathResolver


@dataclass
class PreflightResult:
    """The plans of every stage and what they mean for the job."""

    plans: list[StagePlan]
    model_config: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": [p.to_json() for p in self.plans], "modelConfig": self.model_config}
        if self.notes:
            out["notes"] = list(self.notes)
        reason, message = outcome(self)
        out["verdict"] = {"reason": reason, "message": message} if reason else {"reason": None, "message": "ok"}
        return out


def load_shape(
    job: FineTuneJob, resolver: PathResolver, model_config: str | os.PathLike[str] | None
) -> tuple[ModelShape, str]:
    """The model's shape from ``model_config`` (a folder or a config.json) or the model folder on the volume."""
    if model_config is not None:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
    else:
        path = Path(paths.model_dir(job, resolver)) / "config.json"
    if not path.is_file():
        where = paths.model_dir(job, resolver)
        if job.spec.model.source and model_config is None:
            raise ModelNotFoundError(
                f"model.source {job.spec.model.source} has no local copy at {where} yet: give the folder of its "
                "config.json (--model-config DIR), or run the download step first"
            )
        raise ModelNotFoundError(f"base model not found: no config.json at {path} (spec.model.volume: {where})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"{path}: not a readable config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{path}: config.json must be a JSON object")
    try:
        return shape_from_config(config), str(path)
    except ShapeError as exc:
        raise ModelNotFoundError(f"{path}: {exc}") from exc


def check_data(job: FineTuneJob, resolver: PathResolver, tokenizer_dir: str) -> dict[str, StageData]:
    """Run the data check on every stage with the rendered configs (dataset_info.json in a scratch folder)."""
    from finetune_operator.worker.datacheck import check_stage

    out: dict[str, StageData] = {}
    chain = lf.chain(job, resolver)
    with tempfile.TemporaryDirectory(prefix="ft-preflight-") as scratch:
        Path(scratch, "dataset_info.json").write_text(to_json(lf.dataset_info(job, resolver)), encoding="utf-8")
        for stage in job.spec.stages:
            cfg = lf.train_config(job, stage.name, resolver, stage_chain=chain)
            cfg["dataset_dir"] = scratch
            out[stage.name] = check_stage(cfg, name=stage.name, tokenizer_dir=tokenizer_dir)
    return out


def lf_available() -> bool:
    try:
        import llamafactory  # noqa: F401
    except Exception:  # LLaMA-Factory's import can fail in many ways on a machine without its stack
        return False
    return True


def run_preflight(
    job: FineTuneJob,
    resolver: PathResolver,
    *,
    gpu: str | None = None,
    model_config: str | os.PathLike[str] | None = None,
    data: bool = True,
) -> PreflightResult:
    """Plan every stage (see the module docstring). Raises :class:`ModelNotFoundError` without a config.json."""
    shape, config_path = load_shape(job, resolver, model_config)
    notes: list[str] = []
    stage_data: Mapping[str, StageData] = {}
    if data:
        tokenizer_dir = str(Path(config_path).parent)
        if not lf_available():
            notes.append("data check skipped: LLaMA-Factory is not installed here (pip install the train extra)")
        elif not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            notes.append(f"data check skipped: no tokenizer in {tokenizer_dir}")
        else:
            try:
                stage_data = check_data(job, resolver, tokenizer_dir)
            except DataError as exc:
                notes.append(f"data check failed: {exc}")
    plans = plan_job(job, shape, data=stage_data, gpu_override=gpu)
    return PreflightResult(plans=plans, model_config=config_path, notes=notes)


def outcome(result: PreflightResult) -> tuple[str | None, str]:
    """(reason, message) that fails the job -- ``InvalidData`` first, then ``WillNotFit`` -- or (None, "")."""
    for p in result.plans:
        if p.data is not None and p.data.problems:
            return Reason.INVALID_DATA, f"stage {p.name}: " + "; ".join(p.data.problems)
    for p in result.plans:
        if p.verdict == NO_FIT and p.gpu is not None:
            fix = f"; {p.suggestion}" if p.suggestion else ""
            return Reason.WILL_NOT_FIT, (
                f"stage {p.name}: estimated peak {p.gpu_memory_gib:.1f} GiB per GPU exceeds the "
                f"{p.gpu.memory_gib:.1f} GiB of {p.gpu.name}{fix}"
            )
    return None, ""


def plan_status(result: PreflightResult) -> dict[str, Any]:
    """``status.plan`` (camelCase, bounded like :class:`~finetune_operator.api.types.PlanStatus`)."""
    from finetune_operator.api.types import PlannedStage, PlanStatus

    stages = []
    for p in result.plans:
        data = p.data
        stages.append(
            PlannedStage(
                name=p.name,
                gpu_memory_gi_b=p.gpu_memory_gib,
                gpu=p.gpu.name if p.gpu else None,
                gpu_capacity_gi_b=p.gpu.memory_gib if p.gpu else None,
                verdict=p.verdict,
                suggestion=(p.suggestion or None) and str(p.suggestion)[:1024],
                samples=data.samples if data is not None else None,
                dropped=sum(sum(d.dropped.values()) for d in data.datasets) if data is not None else None,
                truncated=data.truncated if data is not None else None,
                tokens=p.tokens,
                total_steps=p.total_steps,
                estimated_seconds=round(p.duration_seconds) if p.duration_seconds is not None else None,
            )
        )
    reason, message = outcome(result)
    status = PlanStatus(stages=stages, reason=reason, message=message[:2048] or None)
    return dict(status.model_dump(by_alias=True, exclude_none=True, mode="json"))


def enforce(result: PreflightResult, mode: str) -> str | None:
    """Raise the refusal (``Enforce``): :class:`DataError` (exit 3) or :class:`WillNotFitError` (exit 12).
    Returns the warning to log in ``Warn`` mode, else None."""
    reason, message = outcome(result)
    if reason is None:
        return None
    if mode == "Enforce":
        if reason == Reason.INVALID_DATA:
            raise DataError(f"{Reason.INVALID_DATA}: {message}")
        raise WillNotFitError(f"{Reason.WILL_NOT_FIT}: {message}")
    return f"{reason}: {message} (spec.preflight.mode {mode}: continuing)"


def run_in_pod(config: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> int:
    """``ftctl worker preflight --config preflight.json``: plan, report ``status.plan``, refuse or pass.

    Volumes are where the pod mounts them (``/mnt/volumes/<claim>``); ``FT_VOLUME_ROOT`` moves that root for
    tests and out-of-cluster use (like ``FT_KUBE_API`` for the API server)."""
    import logging

    from finetune_operator.estimate.report import to_text
    from finetune_operator.worker.progress import StatusReporter

    log = logging.getLogger("finetune_operator.worker.preflight")
    try:
        doc = json.loads(Path(config).read_text(encoding="utf-8"))
        job = FineTuneJob.model_validate(doc)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the preflight config {config}: {exc}") from exc
    env = os.environ if environ is None else environ
    root = env.get("FT_VOLUME_ROOT")
    result = run_preflight(job, PathResolver(volume_root=root) if root else PathResolver())
    log.info("plan of %s:\n%s", job.name, to_text(result.plans))
    for note in result.notes:
        log.info("note: %s", note)
    reporter = StatusReporter.from_env("preflight", environ)
    if reporter is not None:
        reporter.patch_status({"plan": plan_status(result)})
    warning = enforce(result, job.spec.preflight.mode)
    if warning:
        log.warning("%s", warning)
    return 0
