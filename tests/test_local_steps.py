"""``ftctl run --local`` walks the rendered plan's steps and dispatches on each step's kind through a registry.

No training here: the registry's handlers are replaced by recorders (``monkeypatch.setitem``), so what is
checked is the walk itself, which steps run, in which order, what ends in ``outputs.json``, and that a kind
nobody registered stops the run before anything happens. The real handlers run in ``test_local_run.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.local import runner, steps
from finetune_operator.render.plan import Plan, Step, StepKind
from finetune_operator.validation import validate

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "manifests/examples/06-contract-sft-dpo-merge-serve.yaml"


def contract_job() -> Any:
    return validate(yaml.safe_load(CONTRACT.read_text()))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every registered kind replaced by a recorder of ``(kind, step name)``; serve stays deferred."""
    calls: list[tuple[str, str]] = []
    for kind in list(steps.STEP_RUNNERS):

        def record(step: Step, run: steps.LocalRun, _kind: str = kind) -> steps.StepOutcome:
            calls.append((_kind, step.name))
            if _kind == "serve":
                return steps.StepOutcome(deferred=True)
            if _kind == "download":
                return steps.StepOutcome()  # like the real one: nothing to record
            return steps.StepOutcome(summary={"outputDir": step.output_path, "ran": True})

        monkeypatch.setitem(steps.STEP_RUNNERS, kind, record)
    return calls


def with_extra_step(plan: Plan, kind: str) -> Plan:
    extra = Step(name="publish", kind=kind, type=kind, objects=(), workload={})  # type: ignore[arg-type]
    return dataclasses.replace(plan, steps=(*plan.steps[:-1], extra, plan.steps[-1]))


def test_every_step_kind_the_renderer_knows_has_a_local_handler() -> None:
    assert set(get_args(StepKind)) <= set(steps.STEP_RUNNERS)


def test_local_run_dispatches_the_plans_steps_in_order(recorded: list[tuple[str, str]], tmp_path: Path) -> None:
    job = contract_job()
    opts = runner.LocalOptions(workdir=tmp_path / "wd", environ={})
    plan = runner.render(job, runner.RenderOptions(resolver=runner.resolver_for(job, opts)))

    result = runner.run_local(job, opts)

    assert recorded == [(s.kind, s.name) for s in plan.steps]
    assert [k for k, _ in recorded] == ["download", "preflight", "train", "train", "merge", "serve"]
    assert result.deferred == ("serve",)
    written = json.loads((result.config_dir.parent / "outputs.json").read_text())
    assert sorted(written["stages"]) == sorted(s.name for s in plan.steps if s.kind in ("preflight", "train", "merge"))
    assert "endpoint" not in written["outputs"]


def test_an_unknown_step_kind_is_an_error_before_anything_runs(
    recorded: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = runner.render
    monkeypatch.setattr(runner, "render", lambda job, options: with_extra_step(real_render(job, options), "shipit"))
    opts = runner.LocalOptions(workdir=tmp_path / "wd", environ={})

    with pytest.raises(steps.UnknownStepKind) as err:
        runner.run_local(contract_job(), opts)

    assert "step 'publish' is of kind 'shipit'" in str(err.value)
    assert "known kinds: download, eval, merge, preflight, publish, serve, train" in str(err.value)
    assert recorded == []  # not even the download ran
    assert not (tmp_path / "wd").exists()


def test_ftctl_run_reports_an_unknown_step_kind_without_a_traceback(
    recorded: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_render = runner.render
    monkeypatch.setattr(runner, "render", lambda job, options: with_extra_step(real_render(job, options), "shipit"))

    code = main(["run", "--local", "-f", str(CONTRACT), "--workdir", str(tmp_path / "wd")])

    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert "error: step 'publish' is of kind 'shipit', which ftctl run --local cannot run" in err
    assert "Traceback" not in err
    assert recorded == []


def test_a_kind_is_registered_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "STEP_RUNNERS", dict(steps.STEP_RUNNERS))
    register = steps.local_step("custom")
    register(lambda step, run: steps.StepOutcome())
    with pytest.raises(ValueError, match="'custom' is already registered"):
        steps.local_step("custom")(lambda step, run: steps.StepOutcome())
    with pytest.raises(ValueError, match="'train' is already registered"):
        steps.local_step("train")(lambda step, run: steps.StepOutcome())
