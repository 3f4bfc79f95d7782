"""The separate trl that LLaMA-Factory's PPO stage needs, and the environment that selects it for ``ppo`` stages.

Why a second trl: LLaMA-Factory 0.9.5 trains PPO with trl's original ``PPOTrainer`` (``step()`` over
query/response batches, ``AutoModelForCausalLMWithValueHead``), which trl replaced by an unrelated trainer of the
same name; its PPO trainer refuses any trl outside 0.8.6-0.9.6 (a ``require_version`` that
``DISABLE_VERSION_CHECK`` does not skip), while its DPO and KTO trainers need trl >= 0.18 (the environment pins
0.24). One environment cannot hold both. So the environment keeps its trl, and the old trl (with tyro and tyro's
own requirements, which only it needs) is installed with ``--no-deps`` into a folder of its own. The trainer
processes of a ``ppo`` stage get that folder first on ``PYTHONPATH``; nothing else changes for them (torch,
transformers, peft, accelerate, datasets and LLaMA-Factory are the environment's), and no other stage sees it.

Where the folder is: ``FT_PPO_TRL_PATH``, else ``/opt/trl-ppo`` (the worker image installs :data:`REQUIREMENTS`
there, images/Dockerfile); the development setup installs them into ``.venv-trl-ppo`` (scripts/setup.sh).
tests/test_dockerfile.py checks that both install exactly :data:`REQUIREMENTS`.

The trainer process needs three small, documented shims for this combination: :mod:`.ppocompat`. This module is
pure (no torch, no transformers): the worker imports it before launching anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from finetune_operator.errors import TrainingError

#: What the folder holds, installed with ``pip install --no-deps --target <folder>``: trl's newest release that
#: LLaMA-Factory's PPO trainer accepts, and tyro (imported by that trl's ``PPOConfig``) with its requirements
#: that the environment lacks (typing-extensions is already there).
REQUIREMENTS: tuple[str, ...] = ("trl==0.9.6", "tyro==1.0.17", "docstring-parser==0.18.0", "typeguard==4.6.1")
#: The trl versions LLaMA-Factory 0.9.5's PPO trainer accepts (train/ppo/trainer.py: ``trl>=0.8.6,<=0.9.6``).
TRL_ACCEPTED = ((0, 8, 6), (0, 9, 6))
#: Overrides the folder.
PATH_ENV = "FT_PPO_TRL_PATH"
#: The folder in the worker image.
DEFAULT_PATH = "/opt/trl-ppo"
#: Set by the worker for a ``ppo`` stage's trainer processes (the folder): :mod:`.lfentry` then applies
#: :mod:`.ppocompat`.
RUNTIME_ENV = "FT_PPO_RUNTIME"

_DIST_INFO = re.compile(r"^trl-(\d+)\.(\d+)\.(\d+)\.dist-info$")


def folder(environ: Mapping[str, str]) -> Path:
    """The folder holding the PPO trl (``FT_PPO_TRL_PATH`` or the image's default), absolute: the trainer may run
    in another working directory."""
    return Path(environ.get(PATH_ENV) or DEFAULT_PATH).absolute()


def trl_version(path: Path) -> tuple[int, int, int] | None:
    """The version of the trl installed in ``path`` (from its ``dist-info`` folder), or None."""
    try:
        names = [p.name for p in path.iterdir()]
    except OSError:
        return None
    found = [m for n in names if (m := _DIST_INFO.match(n))]
    if len(found) != 1 or not (path / "trl" / "__init__.py").is_file():
        return None
    major, minor, patch = (int(g) for g in found[0].groups())
    return major, minor, patch


def _install_hint(path: Path) -> str:
    return f"pip install --no-deps --target {path} {' '.join(REQUIREMENTS)}"


def stage_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a ``ppo`` stage's trainer processes get on top of ``environ``.

    Raises :class:`TrainingError` (before anything is launched) when the folder is missing or holds a trl that
    LLaMA-Factory's PPO trainer would refuse, naming the folder, the variable and the command that fixes it.
    """
    path = folder(environ)
    version = trl_version(path)
    if version is None:
        raise TrainingError(
            f"a ppo stage needs LLaMA-Factory's PPO trl in {path} (none found there; {PATH_ENV} sets the folder). "
            f"Install it with: {_install_hint(path)}"
        )
    low, high = TRL_ACCEPTED
    if not low <= version <= high:
        shown = ".".join(map(str, version))
        raise TrainingError(
            f"{path} holds trl {shown}; LLaMA-Factory's PPO trainer accepts trl "
            f"{'.'.join(map(str, low))}-{'.'.join(map(str, high))}. Reinstall it with: {_install_hint(path)}"
        )
    # The old trl fails LLaMA-Factory's global dependency check (trl >= 0.18), which this variable skips; its
    # PPO trainer's own check (0.8.6-0.9.6) still runs.
    pythonpath = environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": str(path) + (os.pathsep + pythonpath if pythonpath else ""),
        "DISABLE_VERSION_CHECK": "1",
        RUNTIME_ENV: str(path),
    }
