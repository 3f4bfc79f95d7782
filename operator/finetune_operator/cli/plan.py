"""``ftctl plan -f FILE``: will each stage fit on its GPUs, is its data right, how many steps, how long.

Reads the base model's ``config.json`` from the mapped volume (``--volume CLAIM=DIR``, else
``<workdir>/<claim>`` like ``ftctl run --local``) or from ``--model-config DIR`` (a model that is still to be
downloaded), runs the data check with LLaMA-Factory's own loading and template code when it is installed
(``--no-data`` skips it), and prints per stage: parameters, the per-GPU peak memory with its breakdown,
the verdict against the GPU (``--gpu``, ``resources.gpuMemory`` or the ``nvidia.com/gpu.product`` node
selector) with the cheapest change that fits, data statistics, steps and an estimated duration.
``-o json`` prints ``{"stages": [{"name", "gpuMemoryGiB", "fits", "breakdown", "suggestion", ...}]}``.

Exit codes: 0 every stage fits and its data is usable, 1 invalid spec or a stage that does not fit or has
unusable data (what the operator's preflight step would refuse), 2 usage error, 4 no config.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from finetune_operator.api.constants import KIND
from finetune_operator.errors import SpecError, WorkerError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """LLaMA-Factory, transformers and DeepSpeed log to stdout (some from C code): send file descriptor 1 to
    stderr while they run, so that stdout carries the report only."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run(args: argparse.Namespace) -> int:
    from finetune_operator.estimate.report import to_text
    from finetune_operator.local.runner import LocalOptions, parse_volumes, resolver_for
    from finetune_operator.validation import load_documents, validate
    from finetune_operator.worker.preflight import outcome, run_preflight

    try:
        volumes = parse_volumes(args.volume or [])
    except ValueError as exc:
        print(f"ftctl plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        docs = [d for d in load_documents(args.file) if d.get("kind", KIND) == KIND]
        if len(docs) != 1:
            print(f"ftctl plan: {args.file} must hold exactly one {KIND} (found {len(docs)})", file=sys.stderr)
            return EXIT_REFUSED
        job = validate(docs[0])
    except OSError as exc:
        print(f"ftctl plan: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_REFUSED
    resolver = resolver_for(job, LocalOptions(workdir=Path(args.workdir or "finetune-workdir"), volumes=volumes))
    try:
        with _stdout_to_stderr():
            result = run_preflight(job, resolver, gpu=args.gpu, model_config=args.model_config, data=not args.no_data)
    except WorkerError as exc:
        print(f"ftctl plan: {exc}", file=sys.stderr)
        return exc.exit_code
    reason, message = outcome(result)
    if args.output == "json":
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        header = f"{KIND} {job.name}: model {result.model_config}"
        sys.stdout.write(to_text(result.plans, header=header))
        for note in result.notes:
            print(f"note: {note}")
        print(f"verdict: {reason}: {message}" if reason else "verdict: ok")
    return EXIT_REFUSED if reason else EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, help="FineTuneJob YAML")
    parser.add_argument(
        "--workdir", help="local root of the volumes: <workdir>/<claimName> (default ./finetune-workdir)"
    )
    parser.add_argument(
        "--volume", action="append", metavar="CLAIM=DIR", help="use DIR for PersistentVolumeClaim CLAIM (repeatable)"
    )
    parser.add_argument(
        "--gpu", metavar="PRODUCT", help="GPU model for every stage (e.g. NVIDIA-A100-SXM4-80GB, H100, L4)"
    )
    parser.add_argument(
        "--model-config",
        metavar="DIR",
        help="folder (or file) with the model's config.json, for a model.source that is not downloaded yet",
    )
    parser.add_argument("--no-data", action="store_true", help="skip the data check (memory and time only)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="report format")
    parser.set_defaults(func=_run)
