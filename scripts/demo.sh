#!/usr/bin/env bash
# The local, offline demo: set up ./.venv (idempotent), build a tiny Qwen2-architecture model and tiny
# datasets on the spot, and run the bundled FineTuneJob (SFT → DPO → merge) on CPU with the same worker code
# the cluster pods run. Extra arguments go to `ftctl run` (e.g. --smoke for two steps per stage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/ftctl run --local --demo --workdir ./demo-workdir "$@"
