"""``ftctl lineage PATH``: print a model's ``finetune-lineage.json`` (PATH: the model folder or the file).

Works on any copy: a model folder on a volume, an S3 prefix synced down, an ``oras pull`` output, a hub
snapshot. ``--summary`` prints the key facts one per line instead of the JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _summary(doc: dict[str, Any]) -> str:
    base = doc.get("baseModel") or {}
    job = doc.get("job") or {}
    revision = base.get("resolvedRevision") or base.get("revision") or base.get("contentHash") or ""
    lines = [
        f"job:        {job.get('namespace', '')}/{job.get('name', '')}",
        f"run:        {doc.get('runId') or '-'}",
        f"spec:       {doc.get('specHash')}",
        f"base model: {base.get('source') or '(volume)'} {revision}".rstrip(),
    ]
    for d in doc.get("datasets") or []:
        for f in d.get("files", []):
            lines.append(f"dataset:    {d.get('name')}: {f.get('path')} sha256:{f.get('sha256')}")
    for s in doc.get("stages") or []:
        lines.append(f"stage:      {s.get('name')} ({s.get('type')}, {s.get('method')}) {s.get('hyperparameters', {})}")
    for k, v in sorted((doc.get("metrics") or {}).items()):
        lines.append(f"metric:     {k} = {v}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from finetune_operator.worker.lineage import LINEAGE_FILE, read_lineage

    doc = read_lineage(args.path)
    if doc is None:
        print(f"ftctl lineage: no {LINEAGE_FILE} in {args.path} (or it is not valid JSON)", file=sys.stderr)
        return 1
    print(_summary(doc) if args.summary else json.dumps(doc, indent=2, sort_keys=True))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a model folder or its finetune-lineage.json")
    parser.add_argument("--summary", action="store_true", help="key facts, one per line")
    parser.set_defaults(func=_run)
