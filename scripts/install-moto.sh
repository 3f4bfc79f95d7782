#!/usr/bin/env bash
# Create a dedicated virtualenv for moto's S3-compatible server (default .venv-moto, env MOTO_VENV overrides).
#
# Why its own venv: moto (through botocore) requires python-dateutil<3, the Kubernetes client in the main
# venv requires python-dateutil>=3. The tests only start `moto_server` as a separate process on 127.0.0.1, so
# isolating it costs nothing. (The main venv installs boto3/botocore without their dependency pins, see
# scripts/setup.sh.)
set -euo pipefail

MOTO_VERSION="5.2.5"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOTO_VENV:-$ROOT/.venv-moto}"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/moto_server" ]] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$MOTO_VERSION')" 2>/dev/null; then
  echo "moto $MOTO_VERSION already in $VENV"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
echo "moto $MOTO_VERSION in $VENV"
