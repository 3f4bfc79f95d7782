#!/usr/bin/env bash
# Install Debian's `docker-registry` (the CNCF distribution registry) for the OCI publishing tests.
# The tests start it themselves on 127.0.0.1 with their own config; the package's service is not used.
set -euo pipefail
if command -v docker-registry >/dev/null 2>&1; then
  echo "docker-registry: $(docker-registry --version)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "docker-registry is missing: run 'apt-get install -y docker-registry' as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends docker-registry
docker-registry --version
