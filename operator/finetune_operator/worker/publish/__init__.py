"""``ftctl worker publish``: copy the finished model (merged, or the adapters) to its destinations.

Publishing runs as its own step after the promotion gate. It writes ``finetune-lineage.json`` into the model
folder first, so that every copy carries it, then hands the folder to one publisher per destination type
(:data:`PUBLISHERS`, a registry: Hugging Face-compatible hub, S3-compatible object storage, OCI registry).

Every publisher is idempotent: it compares what is already at the destination with the local files (hub:
git/LFS object ids; S3: size and a SHA-256 we store as object metadata; OCI: layer digests) and uploads only
what differs, so a retried or re-run step uploads nothing new. Credentials come from environment variables
only (filled from ``secretKeyRef`` by the renderer, or from ``--secrets-dir`` by ``ftctl run --local``); the
config names the variables, never the values, and error messages are scrubbed of them.

Config (``publish.yaml``, rendered): ``modelDir``, ``artifact`` (merged | adapters), ``lineage`` (see
:mod:`finetune_operator.worker.lineage`), ``metricsFile`` (optional), ``resultFile``, ``destinations``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.errors import PublishError, WorkerError
from finetune_operator.worker import lineage, markers
from finetune_operator.worker.publish import hub, oci, s3
from finetune_operator.worker.publish.files import LocalFile, collect

log = logging.getLogger("finetune_operator.worker.publish")

#: publish(destination config, files, environment) -> result (``url``, ``uploaded``, ``skipped``, ...)
Publisher = Callable[[Mapping[str, Any], list[LocalFile], Mapping[str, str]], dict[str, Any]]

PUBLISHERS: dict[str, Publisher] = {"huggingface": hub.publish, "s3": s3.publish, "oci": oci.publish}


@dataclass
class PublishResult:
    model_dir: Path
    destinations: list[dict[str, Any]]


def _secrets(destination: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    return [env[v] for k, v in destination.items() if k.endswith("Env") and isinstance(v, str) and env.get(v)]


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def load_metrics(path: str | None) -> dict[str, Any]:
    """The evaluation's metrics file (``{}`` when there was no evaluation)."""
    if not path:
        return {}
    data = markers.read_marker(Path(path).parent, Path(path).name)
    return dict(data.get("metrics", data)) if data else {}


def run_publish(config: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> PublishResult:
    """Write the lineage file, then publish ``modelDir`` to every destination (see the module docstring)."""
    env = os.environ if environ is None else environ
    model_dir = Path(str(config["modelDir"]))
    done = markers.read_marker(model_dir)
    if done is None and not (model_dir / "adapter_config.json").is_file():
        raise WorkerError(f"publish: no finished model in {model_dir} (its step has not completed)")
    if config.get("lineage") is not None:
        doc = lineage.build_lineage(config["lineage"], metrics=load_metrics(config.get("metricsFile")))
        lineage.write_lineage(model_dir, doc)
    files = collect(model_dir)
    results = []
    for destination in config.get("destinations", []):
        kind = str(destination.get("type"))
        if kind not in PUBLISHERS:
            raise PublishError(f"destination {destination.get('name')!r}: unknown type {kind!r}")
        secrets = _secrets(destination, env)
        try:
            result = PUBLISHERS[kind](destination, files, env)
        except PublishError as exc:
            raise PublishError(_scrub(f"destination {destination.get('name')!r} ({kind}): {exc}", secrets)) from None
        except Exception as exc:  # SDKs raise many types; the message is what the user needs
            text = _scrub(f"{type(exc).__name__}: {exc}", secrets)
            raise PublishError(f"destination {destination.get('name')!r} ({kind}): {text}") from None
        result = {"name": destination.get("name"), "type": kind, **result}
        log.info(
            "published %s to %s: %d uploaded, %d unchanged",
            model_dir,
            result["url"],
            result["uploaded"],
            result["skipped"],
        )
        results.append(result)
    if config.get("resultFile"):
        markers.write_json_atomic(str(config["resultFile"]), {"destinations": results})
    return PublishResult(model_dir=model_dir, destinations=results)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``publish.yaml`` (JSON is YAML too)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise WorkerError(f"cannot read the publish config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise WorkerError(f"{path}: expected a JSON object")
    return data
