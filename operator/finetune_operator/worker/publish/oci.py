"""Publish to an OCI registry as an artifact, with the ``oras`` Python SDK.

Media-type layout (one OCI image manifest per published model; documented in ``docs/publishing.md``):

=====================  ==========================================================================
manifest               ``application/vnd.oci.image.manifest.v1+json``, ``artifactType``
                       ``application/vnd.finetune.dev.model.v1`` (merged model) or
                       ``application/vnd.finetune.dev.adapter.v1`` (LoRA adapters)
config                 ``application/vnd.finetune.dev.lineage.v1+json``: the lineage document itself
                       (so ``oras manifest fetch-config`` answers "where did this come from")
layers                 one per file, titled with its relative path (``org.opencontainers.image.title``,
                       the ORAS convention: ``oras pull`` restores the folder):
                       weights (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``)
                       ``application/vnd.finetune.dev.model.weights.v1``; ``finetune-lineage.json``
                       ``application/vnd.finetune.dev.lineage.v1+json``; everything else (configs,
                       tokenizer) ``application/vnd.finetune.dev.model.file.v1``
annotations            ``org.opencontainers.image.title`` (job), ``dev.finetune.run-id``; no timestamps,
                       so the same model always gives the same manifest digest
=====================  ==========================================================================

Idempotence: when the tag already points at a manifest with the same config and layer digests nothing is
uploaded; otherwise blobs the registry already has are skipped (``HEAD`` on the blob) and the manifest is put.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_operator.errors import PublishError
from finetune_operator.worker.lineage import LINEAGE_FILE
from finetune_operator.worker.publish.files import LocalFile

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPES = {
    "merged": "application/vnd.finetune.dev.model.v1",
    "adapters": "application/vnd.finetune.dev.adapter.v1",
}
LINEAGE_MEDIA_TYPE = "application/vnd.finetune.dev.lineage.v1+json"
WEIGHTS_MEDIA_TYPE = "application/vnd.finetune.dev.model.weights.v1"
FILE_MEDIA_TYPE = "application/vnd.finetune.dev.model.file.v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TITLE = "org.opencontainers.image.title"
#: Blobs above this size are uploaded in chunks (a single PUT would hold the whole shard in memory).
CHUNKED_ABOVE = 256 * 1024 * 1024


def media_type(rel: str) -> str:
    """The layer media type of a file (see the module docstring)."""
    if rel == LINEAGE_FILE:
        return LINEAGE_MEDIA_TYPE
    if rel.endswith(WEIGHT_SUFFIXES):
        return WEIGHTS_MEDIA_TYPE
    return FILE_MEDIA_TYPE


def build_manifest(
    files: list[LocalFile], *, artifact: str, config_digest: str, config_size: int, annotations: Mapping[str, str]
) -> dict[str, Any]:
    """The OCI manifest for ``files`` (deterministic: same files, same digest)."""
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPES[artifact],
        "config": {"mediaType": LINEAGE_MEDIA_TYPE, "digest": config_digest, "size": config_size},
        "layers": [
            {
                "mediaType": media_type(f.rel),
                "digest": f"sha256:{f.sha256}",
                "size": f.size,
                "annotations": {TITLE: f.rel},
            }
            for f in files
        ],
        "annotations": dict(annotations),
    }


def _auth_backend(host: str, insecure: bool) -> str:
    """``basic`` for registries that challenge with HTTP Basic (a distribution registry with htpasswd),
    ``token`` for the bearer-token flow of most hosted registries (ghcr.io, Docker Hub, Harbor, ...)."""
    import requests

    try:
        response = requests.get(f"{'http' if insecure else 'https'}://{host}/v2/", timeout=30)
    except requests.RequestException as exc:
        raise PublishError(f"registry {host} is not reachable: {type(exc).__name__}") from None
    challenge = response.headers.get("WWW-Authenticate", "")
    return "basic" if challenge.lower().startswith("basic") else "token"


def _registry(destination: Mapping[str, Any], host: str, env: Mapping[str, str]) -> Any:
    import oras.provider

    insecure = bool(destination.get("insecure", False))
    registry = oras.provider.Registry(insecure=insecure, auth_backend=_auth_backend(host, insecure))
    user_env, password_env = destination.get("usernameEnv"), destination.get("passwordEnv")
    if user_env or password_env:
        user, password = env.get(str(user_env or "")), env.get(str(password_env or ""))
        if not user or not password:
            raise PublishError(
                f"the registry credentials are missing (environment variables {user_env} and {password_env})"
            )
        registry.auth.set_basic_auth(user, password)
    return registry


def publish(destination: Mapping[str, Any], files: list[LocalFile], env: Mapping[str, str]) -> dict[str, Any]:
    import oras.container

    reference = str(destination["reference"])
    artifact = str(destination.get("artifact") or "merged")
    container = oras.container.Container(reference)
    registry = _registry(destination, container.registry, env)
    lineage = next((f for f in files if f.rel == LINEAGE_FILE), None)
    config_bytes = lineage.path.read_bytes() if lineage is not None else b"{}"
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    annotations = {k: str(v) for k, v in (destination.get("annotations") or {}).items()}
    manifest = build_manifest(
        files, artifact=artifact, config_digest=config_digest, config_size=len(config_bytes), annotations=annotations
    )
    url = f"oci://{container.registry}/{container.api_prefix}:{container.tag}"
    existing = _existing(registry, container)
    if existing is not None and _same(existing, manifest):
        return {"url": url, "digest": _digest(manifest), "uploaded": 0, "skipped": len(files)}
    uploaded = skipped = 0
    with tempfile.TemporaryDirectory(prefix="ft-oci-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_bytes(config_bytes)
        # Layers first: the config blob is the lineage file's blob, already there when it is a layer too.
        blobs = [(f.path, layer) for f, layer in zip(files, manifest["layers"], strict=True)]
        blobs.append((config_path, manifest["config"]))
        for path, layer in blobs:
            if registry.blob_exists(layer, container):
                skipped += path != config_path
                continue
            blob_layer = {k: v for k, v in layer.items() if k != "annotations"}
            response = registry.upload_blob(str(path), container, blob_layer, do_chunked=layer["size"] > CHUNKED_ABOVE)
            _check(response, f"uploading {path.name}")
            uploaded += path != config_path
    response = registry.do_request(
        f"{registry.prefix}://{container.manifest_url()}",
        "PUT",
        headers={"Content-Type": MANIFEST_MEDIA_TYPE},
        data=_canonical(manifest),
    )
    _check(response, "putting the manifest")
    return {"url": url, "digest": _digest(manifest), "uploaded": uploaded, "skipped": skipped}


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _digest(manifest: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(manifest)).hexdigest()


def _same(existing: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    def key(m: Mapping[str, Any]) -> Any:
        return (
            m.get("artifactType"),
            (m.get("config") or {}).get("digest"),
            [
                (la.get("digest"), la.get("mediaType"), (la.get("annotations") or {}).get(TITLE))
                for la in m.get("layers", [])
            ],
            m.get("annotations") or {},
        )

    return bool(key(existing) == key(manifest))


def _existing(registry: Any, container: Any) -> dict[str, Any] | None:
    response = registry.do_request(
        f"{registry.prefix}://{container.manifest_url()}", "GET", headers={"Accept": MANIFEST_MEDIA_TYPE}
    )
    if response.status_code == 404:
        return None
    _check(response, "reading the existing manifest")
    data = response.json()
    return data if isinstance(data, dict) else None


def _check(response: Any, what: str) -> None:
    if response.status_code in (401, 403):
        raise PublishError(f"{what}: the registry refused the credentials (HTTP {response.status_code})")
    if response.status_code >= 400:
        raise PublishError(f"{what}: HTTP {response.status_code}: {response.text[:300]}")
