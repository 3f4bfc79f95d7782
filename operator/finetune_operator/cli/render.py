"""``ftctl render -f FILE [-o DIR]``: every manifest of a FineTuneJob's pipeline, offline and deterministic.

Without ``-o`` the objects go to stdout as one multi-document YAML stream in creation order. With ``-o DIR``
each step gets its own file, numbered in pipeline order (``00-shared.yaml`` with the ConfigMap, then
``01-download.yaml``, ``02-sft.yaml``, ... ``NN-serve.yaml``), so a GitOps repository can apply them in order or
review them one stage at a time. A FILE with several FineTuneJobs renders each into ``DIR/<job name>/``.

Exit codes: 0 ok, 1 invalid spec (every error printed with its field path), 2 usage (missing file, bad args).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import RenderError, SpecError
from finetune_operator.render import RenderOptions, render
from finetune_operator.render.dump import to_yaml_documents
from finetune_operator.render.plan import Plan

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, metavar="FILE", help="FineTuneJob YAML file ('-': stdin)")
    parser.add_argument("-o", "--output-dir", metavar="DIR", help="write one file per step into DIR")
    parser.add_argument("--worker-image", help="worker image when spec.image is not set")
    parser.add_argument("--vllm-image", help="vLLM image when spec.serve.image is not set")
    parser.set_defaults(func=run)


def _validate(doc: Mapping[str, Any]) -> FineTuneJob:
    """``validation.validate`` (all semantic checks) when available, else the models' shape checks."""
    try:
        from finetune_operator.validation import validate
    except ImportError:  # pragma: no cover - only before validation.py existed
        import pydantic

        from finetune_operator.errors import FieldError

        try:
            return FineTuneJob.model_validate(dict(doc))
        except pydantic.ValidationError as exc:
            raise SpecError([FieldError(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]) from None
    return validate(doc)


def _load(path: str) -> list[dict[str, Any]]:
    from finetune_operator.validation import load_documents

    return load_documents(path)


def step_files(plan: Plan) -> dict[str, str]:
    """File name -> YAML text, one file per step (``00-shared.yaml`` first)."""
    files = {"00-shared.yaml": to_yaml_documents(plan.shared)}
    for i, step in enumerate(plan.steps, start=1):
        files[f"{i:02d}-{step.name}.yaml"] = to_yaml_documents(step.objects)
    return files


def run(args: argparse.Namespace) -> int:
    try:
        docs = _load(args.filename)
    except OSError as exc:
        print(f"ftctl render: cannot read {args.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:
        print(f"{args.filename}: {exc.render()}", file=sys.stderr)
        return EXIT_INVALID
    if not docs:
        print(f"ftctl render: {args.filename} contains no FineTuneJob", file=sys.stderr)
        return EXIT_USAGE
    opts_kw: dict[str, Any] = {}
    if args.worker_image:
        opts_kw["worker_image"] = args.worker_image
    if args.vllm_image:
        opts_kw["vllm_image"] = args.vllm_image
    options = RenderOptions(**opts_kw)
    plans: list[Plan] = []
    names: list[str] = []
    failed = False
    for i, doc in enumerate(docs):
        where = args.filename if len(docs) == 1 else f"{args.filename} (document {i + 1})"
        try:
            job = _validate(doc)
            plans.append(render(job, options))
            names.append(job.name)
        except SpecError as exc:
            print(f"{where}: {exc.render()}", file=sys.stderr)
            failed = True
        except RenderError as exc:
            print(f"{where}: cannot render: {exc}", file=sys.stderr)
            failed = True
    if failed:
        return EXIT_INVALID
    if not args.output_dir:
        sys.stdout.write("".join(to_yaml_documents(p.objects()) for p in plans))
        return EXIT_OK
    out = Path(args.output_dir)
    try:
        for name, plan in zip(names, plans, strict=True):
            target = out / name if len(plans) > 1 else out
            target.mkdir(parents=True, exist_ok=True)
            for fname, text in step_files(plan).items():
                (target / fname).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"ftctl render: cannot write to {args.output_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
