"""Publish to S3-compatible object storage with ``boto3``.

Objects go to ``s3://<bucket>/<prefix>/<relative path>``. Each object carries its SHA-256 as user metadata
(``x-amz-meta-sha256``); a file whose object already exists with the same size and hash is skipped, so a
re-run uploads nothing. ETags are not used for this: a multipart upload's ETag is not a content hash.
The bucket must exist (creating buckets is an administrator's decision, not a training job's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.errors import PublishError
from finetune_operator.worker.publish.files import LocalFile


def _client(destination: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    creds: dict[str, str] = {}
    for key, arg in (("accessKeyIdEnv", "aws_access_key_id"), ("secretAccessKeyEnv", "aws_secret_access_key")):
        name = destination.get(key)
        if name:
            if not env.get(str(name)):
                raise PublishError(f"the S3 credential {key[:-3]} is missing (environment variable {name} is empty)")
            creds[arg] = env[str(name)]
    return boto3.client(
        "s3",
        endpoint_url=destination.get("endpointUrl") or None,
        region_name=destination.get("region") or "us-east-1",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
        **creds,
    )


def publish(destination: Mapping[str, Any], files: list[LocalFile], env: Mapping[str, str]) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    client = _client(destination, env)
    bucket = str(destination["bucket"])
    prefix = str(destination.get("prefix") or "").strip("/")
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise PublishError(f"bucket {bucket!r} is not accessible ({code or exc}): it must exist") from None
    uploaded = skipped = 0
    for f in files:
        key = f"{prefix}/{f.rel}" if prefix else f.rel
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if head.get("ContentLength") == f.size and head.get("Metadata", {}).get("sha256") == f.sha256:
                skipped += 1
                continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchKey", "NotFound"}:
                raise
        client.upload_file(str(f.path), bucket, key, ExtraArgs={"Metadata": {"sha256": f.sha256}})
        uploaded += 1
    return {"url": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", "uploaded": uploaded, "skipped": skipped}
