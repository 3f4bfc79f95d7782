#!/usr/bin/env bash
# Build the product's images on a machine without Docker and without a registry, with Debian's buildah
# (vfs storage, chroot isolation), for the end-to-end tests (tests/test_e2e.py) and for trying the images
# locally. A cluster build uses `docker build` with the real bases instead (README, "Images").
#
#   localhost/finetune-base-debian:bookworm    Debian bookworm made with debootstrap (no registry to pull from)
#   localhost/finetune-base-python:3.11        stands in for PYTHON_IMAGE (python:3.11-slim): Debian's Python 3.11
#                                              in a venv on PATH, so `python` and `pip` work as in the official image
#   localhost/finetune-base-torch:2.13.0-cpu   stands in for TORCH_IMAGE (pytorch/pytorch): the above + CPU torch
#                                              2.13.0 (+ torchaudio's Python part: LLaMA-Factory imports it)
#   localhost/finetune-operator:dev            images/Dockerfile --target operator  \  the same Dockerfile a cluster
#   localhost/finetune-worker:dev              images/Dockerfile --target worker    /  build uses; only the bases differ
#   localhost/finetune-vllm:dev                stands in for vllm/vllm-openai: vLLM's CPU build (scripts/install-vllm.sh)
#
# Idempotent and cached: every image carries the hash of its inputs (this script's recipe for it, the files it
# copies, the hash of its base) in the label dev.finetune.inputs; an image whose label matches is not rebuilt.
# A fresh machine builds everything in about 10-15 minutes on 2 cores (bench/README.md has measured times).
#
# Registries are reached as the host reaches them: pip's configuration (its config files and the files and
# folders its settings name: CA bundle, constraints, local wheel folders) is mounted read-only at the same
# paths into the build steps that install Python packages.
#
# Usage: scripts/build-images.sh [operator|worker|vllm ...]   (default: all three and their bases)
# Env:   FT_IMAGE_TAG (default dev), DEBIAN_MIRROR (default: the first Debian mirror apt uses here),
#        FT_BUILD_CACHE (where the debootstrap tree is kept between runs; default /var/cache/finetune-operator)
# Needs root (buildah with chroot isolation, debootstrap); installs buildah and debootstrap with apt if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${FT_IMAGE_TAG:-dev}"
CACHE="${FT_BUILD_CACHE:-/var/cache/finetune-operator}"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
DEBIAN_IMAGE="localhost/finetune-base-debian:bookworm"
PYTHON_IMAGE="localhost/finetune-base-python:3.11"
TORCH_IMAGE="localhost/finetune-base-torch:2.13.0-cpu"
TORCH_VERSION="2.13.0+cpu"
TORCHAUDIO_VERSION="2.11.0"
LABEL_KEY="dev.finetune.inputs"

log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing buildah and debootstrap (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq buildah debootstrap >/dev/null
fi

# Working containers of a build that failed half-way are removed (vfs keeps each as a full copy).
containers=()
cleanup() { for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT
new_container() { ctr="$(buildah from "$1")"; containers+=("$ctr"); }  # sets ctr

# ---- helpers --------------------------------------------------------------------------------------------

# sha256 of stdin
digest() { sha256sum | cut -c1-32; }

# The hash of files and folders (content and relative path; caches excluded).
files_hash() {
  find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | digest
}

# The inputs label of an image, empty when the image does not exist.
current_inputs() {
  buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$LABEL_KEY\"}}" "$1" 2>/dev/null || true
}

up_to_date() {  # IMAGE HASH
  if [[ "$(current_inputs "$1")" == "$2" ]]; then
    log "$1 is up to date (inputs $2)"
    return 0
  fi
  return 1
}

# The body of this script's function $1: the recipe of an image is part of its inputs.
recipe() { declare -f "$1" | digest; }

# `-v SRC:SRC:ro` for pip's config files and every existing file or folder its settings name.
pip_mounts() {
  local py paths=() p
  py="$(command -v python3)"
  for p in /etc/pip.conf /etc/xdg/pip/pip.conf "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf" \
           "$HOME/.pip/pip.conf" "${PIP_CONFIG_FILE:-}"; do
    [[ -n "$p" && -f "$p" ]] && paths+=("$p")
  done
  while IFS= read -r p; do
    p="${p#file://}"
    p="${p%/}"
    # A local "simple" index links to its files relatively (../../files/...): mount the folder above it.
    [[ "$p" == */simple ]] && p="$(dirname "$p")"
    [[ "$p" == /* && -e "$p" ]] && paths+=("$p")
  done < <("$py" -m pip config list 2>/dev/null | sed -E "s/^[^=]+='(.*)'$/\1/" | tr ' ' '\n')
  printf '%s\n' "${paths[@]}" | sort -u | while IFS= read -r p; do printf -- '-v\n%s:%s:ro\n' "$p" "$p"; done
}

pip_mount_args=()
while IFS= read -r line; do pip_mount_args+=("$line"); done < <(pip_mounts)

# pip's download cache of this machine, shared with the vLLM image's `buildah run` step: what
# scripts/setup.sh and scripts/install-vllm.sh already downloaded is not fetched again, and nothing of the
# cache lands in an image (it is a mount). The Dockerfile's own steps use --no-cache-dir, as a cluster build does.
pip_cache_args=()
host_cache="$(python3 -m pip cache dir 2>/dev/null || true)"
if [[ -n "$host_cache" ]]; then
  mkdir -p "$host_cache"
  pip_cache_args=(-v "$host_cache:/root/.cache/pip")
fi

# The pip settings of this machine as environment (PIP_* variables), for `buildah run`.
pip_env_args=()
while IFS='=' read -r k v; do pip_env_args+=(--env "$k=$v"); done < <(env | grep -E '^PIP_(CERT|FIND_LINKS|CONSTRAINT|EXTRA_INDEX_URL|INDEX_URL|DEFAULT_TIMEOUT)=' || true)

mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m="$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 | tr -d ' ')"
  echo "${m:-http://deb.debian.org/debian}"
}

# ---- bases ----------------------------------------------------------------------------------------------

build_debian() {
  local rootfs="$CACHE/bookworm-rootfs" ctr mnt
  if [[ ! -f "$rootfs/.complete" ]]; then
    rm -rf "$rootfs" "$rootfs.tmp"
    mkdir -p "$CACHE"
    log "debootstrap bookworm from $(mirror) (about 2 minutes)"
    debootstrap --variant=minbase bookworm "$rootfs.tmp" "$(mirror)" >/dev/null
    rm -rf "$rootfs.tmp/var/cache/apt/archives/"*.deb "$rootfs.tmp/var/lib/apt/lists/"*
    mv "$rootfs.tmp" "$rootfs"
    touch "$rootfs/.complete"
  fi
  new_container scratch
  mnt="$(buildah mount "$ctr")"
  tar -C "$rootfs" --exclude=./.complete -cf - . | tar -C "$mnt" -xf -
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
    --label "$LABEL_KEY=$1" "$ctr"
  buildah commit --quiet --rm "$ctr" "$DEBIAN_IMAGE" >/dev/null
}

build_python() {
  local ctr
  new_container "$DEBIAN_IMAGE"
  buildah run "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends python3 python3-venv ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/python && /opt/python/bin/python -m pip --version'
  buildah config --env PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --label "$LABEL_KEY=$1" "$ctr"
  buildah commit --quiet --rm "$ctr" "$PYTHON_IMAGE" >/dev/null
}

build_torch() {
  local ctr
  new_container "$PYTHON_IMAGE"
  # A C++ compiler and Python's headers, as the PyTorch "devel" image has: DeepSpeed builds its CPU ops (the
  # shared-memory collective it uses on CPU, cpu_adam) just in time.
  buildah run "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends g++ python3-dev >/dev/null && rm -rf /var/lib/apt/lists/*'
  # torchaudio: PyPI has CUDA builds only; its Python part is what LLaMA-Factory imports (scripts/setup.sh).
  buildah run "${pip_mount_args[@]}" "${pip_env_args[@]}" --env PIP_NO_CACHE_DIR=1 "$ctr" -- sh -c \
    "pip install -q 'torch==$TORCH_VERSION' \
     && pip install -q --no-deps 'torchaudio==$TORCHAUDIO_VERSION' \
     && rm -f /opt/python/lib/python3*/site-packages/torchaudio/lib/*.so \
     && python -c 'import torch; print(torch.__version__)'"
  buildah config --label "$LABEL_KEY=$1" "$ctr"
  buildah commit --quiet --rm "$ctr" "$TORCH_IMAGE" >/dev/null
}

# ---- product images -------------------------------------------------------------------------------------

# --layers: every Dockerfile step is cached as an image of its own, so a code change rebuilds only the small
# layer that installs our wheel, not the worker's gigabytes of dependencies (vfs stores each layer in full).
# --format docker: the Dockerfile's SHELL (bash with pipefail) is honoured, as `docker build` does.
build_target() {  # TARGET IMAGE HASH
  buildah bud --quiet --layers --format docker -f images/Dockerfile --target "$1" \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg TORCH_IMAGE="$TORCH_IMAGE" \
    --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "${pip_mount_args[@]}" --label "$LABEL_KEY=$3" -t "$2" . >/dev/null
}

build_vllm() {
  local ctr
  new_container "$PYTHON_IMAGE"
  # libnuma: vLLM's CPU kernels link it (vllm/vllm-openai has it; without it the engine fails to start).
  buildah run "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends libnuma1 >/dev/null && rm -rf /var/lib/apt/lists/*'
  buildah run "${pip_mount_args[@]}" "${pip_cache_args[@]}" "${pip_env_args[@]}" \
    -v "$PWD/scripts/install-vllm.sh:/usr/local/share/install-vllm.sh:ro" "$ctr" -- \
    sh -c 'PYTHON=/usr/bin/python3 bash /usr/local/share/install-vllm.sh /opt/vllm >/dev/null \
      && /opt/vllm/bin/python -c "import vllm._C"'
  buildah config --env PATH=/opt/vllm/bin:/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env HOME=/tmp --env VLLM_NO_USAGE_STATS=1 --user 65532:65532 --workingdir /tmp \
    --entrypoint '["vllm", "serve"]' --cmd '' --label "$LABEL_KEY=$1" "$ctr"
  buildah commit --quiet --rm "$ctr" "localhost/finetune-vllm:$TAG" >/dev/null
}

timed() {  # IMAGE FUNCTION ARGS...: build IMAGE, then drop the image it replaces (vfs keeps layers in full)
  local name="$1" start old new
  shift
  old="$(buildah inspect --type image --format '{{.FromImageID}}' "$name" 2>/dev/null || true)"
  start=$(date +%s)
  log "building $name"
  "$@"
  log "built $name in $(($(date +%s) - start)) s"
  new="$(buildah inspect --type image --format '{{.FromImageID}}' "$name")"
  # Not for the Dockerfile targets: `buildah rmi` also removes an image's untagged parents, which are the
  # cached layers a later build reuses.
  if [[ -n "$old" && "$old" != "$new" && "$1" != build_target ]]; then buildah rmi "$old" >/dev/null 2>&1 || true; fi
}

# ---- what to build --------------------------------------------------------------------------------------

wanted=("$@")
[[ ${#wanted[@]} -eq 0 ]] && wanted=(operator worker vllm)
want() { [[ " ${wanted[*]} " == *" $1 "* ]]; }

h_debian="$(printf '%s %s' "$(recipe build_debian)" bookworm | digest)"
h_python="$(printf '%s %s' "$(recipe build_python)" "$h_debian" | digest)"
h_torch="$(printf '%s %s' "$(recipe build_torch)" "$h_python" | digest)"
# README.md (the wheel's long description) and pyproject's [tool.*] tables other than setuptools (linters,
# pytest) change nothing that is installed: leaving them out keeps such edits from rebuilding the images.
h_pyproject="$(python3 -c 'import json, tomllib
d = tomllib.load(open("pyproject.toml", "rb"))
d["tool"] = {"setuptools": d.get("tool", {}).get("setuptools")}
print(json.dumps(d, sort_keys=True))' | digest)"
h_product="$(printf '%s %s' "$(files_hash images/Dockerfile .dockerignore operator)" "$h_pyproject" | digest)"
h_operator="$(printf 'operator %s %s %s' "$(recipe build_target)" "$h_product" "$h_python" | digest)"
h_worker="$(printf 'worker %s %s %s' "$(recipe build_target)" "$h_product" "$h_torch" | digest)"
h_vllm="$(printf '%s %s %s' "$(recipe build_vllm)" "$(files_hash scripts/install-vllm.sh)" "$h_python" | digest)"

up_to_date "$DEBIAN_IMAGE" "$h_debian" || timed "$DEBIAN_IMAGE" build_debian "$h_debian"
up_to_date "$PYTHON_IMAGE" "$h_python" || timed "$PYTHON_IMAGE" build_python "$h_python"
# Three independent chains from the Python base, built at once: downloads of one overlap the CPU-bound
# installs and layer commits of the others (on a fresh 2-core machine this saves several minutes).
chains=()
if want vllm && ! up_to_date "localhost/finetune-vllm:$TAG" "$h_vllm"; then
  (trap cleanup EXIT; timed "localhost/finetune-vllm:$TAG" build_vllm "$h_vllm") &
  chains+=($!)
fi
if want operator && ! up_to_date "localhost/finetune-operator:$TAG" "$h_operator"; then
  (trap cleanup EXIT; timed "localhost/finetune-operator:$TAG" build_target operator "localhost/finetune-operator:$TAG" "$h_operator") &
  chains+=($!)
fi
if want worker; then
  up_to_date "$TORCH_IMAGE" "$h_torch" || timed "$TORCH_IMAGE" build_torch "$h_torch"
  up_to_date "localhost/finetune-worker:$TAG" "$h_worker" ||
    timed "localhost/finetune-worker:$TAG" build_target worker "localhost/finetune-worker:$TAG" "$h_worker"
fi
failed=0
for pid in "${chains[@]}"; do wait "$pid" || failed=1; done
if [[ $failed -ne 0 ]]; then
  log "an image failed to build (see above)"
  exit 1
fi
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E 'localhost/finetune-' >&2 || true
