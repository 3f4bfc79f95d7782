#!/usr/bin/env bash
# Create a dedicated virtualenv for checkov (default .venv-checkov, env CHECKOV_VENV overrides).
#
# Why its own venv: checkov pins boto3, packaging and friends at versions that conflict with the
# product's and the test stack's dependencies; isolating it keeps both installable.
# The scanner runs offline in the tests: `checkov --skip-download --framework kubernetes`.
set -euo pipefail

CHECKOV_VERSION="3.3.30"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHECKOV_VENV:-$ROOT/.venv-checkov}"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/checkov" ]] && "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "checkov $CHECKOV_VERSION already in $VENV"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
"$VENV/bin/checkov" --version
