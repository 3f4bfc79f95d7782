#!/usr/bin/env bash
# Create ./.venv with finetune-operator, its `train` extra (LLaMA-Factory on CPU), `publish` and `dev` extras.
#
# Why not a plain `pip install -e '.[train,dev]'`:
#  * llamafactory==0.9.5 is installed with --no-deps: its own requirements pull gradio, torchvision and a
#    CUDA torch that text-model training does not need (the pinned stack it does need is in the `train` extra).
#  * llamafactory imports torchaudio unconditionally (data/mm_plugin.py). PyPI only has CUDA builds of
#    torchaudio, which fail to load beside the CPU torch. We install its pure-Python part (--no-deps) and remove
#    its compiled libraries, which text-only training never calls. The worker image installs the real CUDA
#    torch/torchaudio instead (images/Dockerfile).
#  * LLaMA-Factory's PPO trainer needs trl 0.8.6-0.9.6, the rest of it trl >= 0.18 (pinned 0.24 in pyproject):
#    the old trl and what only it needs go into .venv-trl-ppo (--no-deps --target), which the worker puts first
#    on PYTHONPATH for `ppo` stages only (FT_PPO_TRL_PATH; operator/finetune_operator/worker/ppo_runtime.py).
#    images/Dockerfile installs the same pins into /opt/trl-ppo (tests/test_dockerfile.py checks they agree).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (pip's notes about unused local find-links folders are filtered out; real errors still fail the script.)
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }
pip install torch==2.13.0
pip install --no-deps llamafactory==0.9.5
pip install -e '.[train,publish,dev]'
# boto3 for S3 publishing, without its dependency pins: botocore requires python-dateutil<3, the Kubernetes
# client >=3 (botocore works with both). images/Dockerfile installs the same pins the same way.
pip install --no-deps boto3==1.44.5 botocore==1.44.8 s3transfer==0.19.3
pip install --no-deps torchaudio==2.11.0
rm -f .venv/lib/python3*/site-packages/torchaudio/lib/*.so
PPO_TRL="trl==0.9.6 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1"
if [ "$(cat .venv-trl-ppo/.pins 2>/dev/null)" != "$PPO_TRL" ]; then
  rm -rf .venv-trl-ppo
  # shellcheck disable=SC2086 # one argument per pin
  pip install --no-deps --target .venv-trl-ppo $PPO_TRL
  rm -rf .venv-trl-ppo/tests .venv-trl-ppo/bin  # trl's wheel ships a top-level `tests` package and a CLI
  echo "$PPO_TRL" > .venv-trl-ppo/.pins
fi
echo "ready: $(pwd)/.venv ($(.venv/bin/python -c 'import torch, llamafactory; print("torch", torch.__version__, "llamafactory", llamafactory.__version__)' 2>/dev/null | tail -1))"
