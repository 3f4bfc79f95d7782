#!/usr/bin/env bash
# Debian's headless Chromium and its WebDriver, for the web console's browser tests (tests/test_console.py).
# Idempotent: installs only what is missing. Needs root (apt-get), as CI has; elsewhere the browser tests
# skip with a message when the browser is absent.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "browser ready: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-browser: not root; install chromium and chromium-driver yourself (the browser tests skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "browser ready: $(chromium --version 2>/dev/null | head -1)"
