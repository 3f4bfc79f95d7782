"""The separate trl of ``ppo`` stages (worker/ppo_runtime.py, worker/ppocompat.py): finding and checking the folder,
the environment only a ppo stage's trainer gets, and the errors when it is missing or wrong.

The real SFT → RM → PPO run through it is tests/test_pipeline_rlhf.py; that the image and the development setup
install the same pins is tests/test_dockerfile.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune_operator.errors import TrainingError
from finetune_operator.worker import ppo_runtime
from finetune_operator.worker.train import run_train
from tests.install_tools import ROOT

#: The folder scripts/setup.sh fills (CI and development).
DEV_FOLDER = ROOT / ".venv-trl-ppo"


def _fake_trl(folder: Path, version: str) -> Path:
    (folder / "trl").mkdir(parents=True)
    (folder / "trl" / "__init__.py").write_text("")
    (folder / f"trl-{version}.dist-info").mkdir()
    return folder


def test_the_development_folder_holds_the_pinned_trl() -> None:
    """scripts/setup.sh installed exactly ppo_runtime.REQUIREMENTS (CI runs it before the tests)."""
    pins = (DEV_FOLDER / ".pins").read_text().split()
    assert pins == list(ppo_runtime.REQUIREMENTS)
    assert ppo_runtime.trl_version(DEV_FOLDER) == (0, 9, 6)
    assert not (DEV_FOLDER / "tests").exists(), "trl's wheel ships a top-level `tests` package: removed"


def test_stage_env_puts_the_folder_first_and_marks_the_stage(tmp_path: Path) -> None:
    folder = _fake_trl(tmp_path / "trl-ppo", "0.9.6")
    env = ppo_runtime.stage_env({ppo_runtime.PATH_ENV: str(folder), "PYTHONPATH": "/a:/b"})
    assert env == {
        "PYTHONPATH": f"{folder}{os.pathsep}/a:/b",
        "DISABLE_VERSION_CHECK": "1",
        ppo_runtime.RUNTIME_ENV: str(folder),
    }
    assert ppo_runtime.stage_env({ppo_runtime.PATH_ENV: str(folder)})["PYTHONPATH"] == str(folder)


def test_the_image_folder_is_the_default() -> None:
    assert ppo_runtime.folder({}) == Path("/opt/trl-ppo") == Path(ppo_runtime.DEFAULT_PATH)


@pytest.mark.parametrize(
    ("version", "message"),
    [(None, "none found there"), ("0.24.0", "holds trl 0.24.0"), ("0.8.5", "holds trl 0.8.5")],
    ids=["missing", "too-new", "too-old"],
)
def test_a_missing_or_wrong_trl_is_named_with_the_fix(tmp_path: Path, version: str | None, message: str) -> None:
    folder = tmp_path / "trl-ppo"
    if version is not None:
        _fake_trl(folder, version)
    with pytest.raises(TrainingError, match=message) as caught:
        ppo_runtime.stage_env({ppo_runtime.PATH_ENV: str(folder)})
    text = str(caught.value)
    assert str(folder) in text
    assert f"pip install --no-deps --target {folder} trl==0.9.6" in text
    assert caught.value.exit_code == 7


def test_a_ppo_stage_without_the_folder_fails_before_launching(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    out = tmp_path / "out" / "ppo"
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(json.dumps({"stage": "ppo", "model_name_or_path": str(model), "output_dir": str(out)}))
    with pytest.raises(TrainingError, match="a ppo stage needs LLaMA-Factory's PPO trl"):
        run_train(cfg, backend="local", environ={ppo_runtime.PATH_ENV: str(tmp_path / "nowhere")})
    assert not out.exists(), "nothing was launched or created"


@pytest.mark.train
def test_the_trainer_refuses_a_trl_not_from_the_folder(tmp_path: Path) -> None:
    """FT_PPO_RUNTIME set but the folder not first on sys.path: the environment's trl 0.24 would be used, and
    LLaMA-Factory's PPO would refuse it far later; the trainer process says why at once."""
    from finetune_operator.worker import ppocompat

    with pytest.raises(ppocompat.PPORuntimeError, match="not from the PPO folder"):
        ppocompat.check_trl(str(_fake_trl(tmp_path / "trl-ppo", "0.9.6")))


def test_a_relative_folder_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer may start in another working directory than the worker."""
    _fake_trl(tmp_path / "trl-ppo", "0.9.6")
    monkeypatch.chdir(tmp_path)
    env = ppo_runtime.stage_env({ppo_runtime.PATH_ENV: "trl-ppo"})
    assert env["PYTHONPATH"] == env[ppo_runtime.RUNTIME_ENV] == str(tmp_path / "trl-ppo")
