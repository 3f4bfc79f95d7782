"""Publish to a Hugging Face-compatible hub with ``huggingface_hub``.

The repository is created when missing (``private`` as configured; an existing repository's visibility is
left alone). One commit carries every changed file; ``huggingface_hub`` itself asks the hub which files
already have the same object id (``preupload``) and drops them, so a re-run makes no commit at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.errors import PublishError
from finetune_operator.worker.publish.files import LocalFile


def publish(destination: Mapping[str, Any], files: list[LocalFile], env: Mapping[str, str]) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd, HfApi

    token_env = destination.get("tokenEnv")
    token = env.get(str(token_env)) if token_env else None
    if token_env and not token:
        raise PublishError(f"the hub token is missing (environment variable {token_env} is empty)")
    endpoint = str(destination.get("endpoint") or env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    repo_id = str(destination["repoId"])
    revision = str(destination.get("revision") or "main")
    api = HfApi(endpoint=endpoint, token=token or False)
    api.create_repo(repo_id, private=bool(destination.get("private", True)), exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=f.rel, path_or_fileobj=str(f.path)) for f in files]
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=str(destination.get("commitMessage") or "finetune-operator: publish model"),
        revision=revision,
        repo_type="model",
    )
    skipped = sum(1 for op in operations if op._remote_oid is not None and op._remote_oid == op._local_oid)
    return {
        "url": f"{endpoint}/{repo_id}",
        "revision": info.oid,
        "uploaded": len(operations) - skipped,
        "skipped": skipped,
    }
