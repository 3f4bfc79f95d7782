"""``ftctl render -f FILE [-o DIR]``: every manifest of a FineTuneJob's pipeline, offline and deterministic.

Without ``-o`` the objects go to stdout as one multi-document YAML stream in creation order. With ``-o DIR``
each step gets its own file, numbered in pipeline order (``00-shared.yaml`` with the ConfigMap, then
``01-download.yaml``, ``02-sft.yaml``, ... ``NN-serve.yaml``), so a GitOps repository can apply them in order or
review them one stage at a time. A FILE with several FineTuneJobs renders each into ``DIR/<job name>/``.

Documents of other kinds in FILE are skipped (as ``ftctl validate`` skips them), with a note on stderr.

Exit codes: 0 ok, 1 invalid spec or a file without a FineTuneJob (every error printed with its field path),
2 usage (missing or unreadable file, bad args, an output folder that cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from finetune_operator.api.constants import KIND
from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import RenderError, SpecError
from finetune_operator.render import RenderOptions, render
from finetune_operator.render.dump import to_yaml_documents
from finetune_operator.render.plan import Plan
from finetune_operator.validation import Policy, load_documents, validate
from finetune_operator.validation.files import duplicate_names, finetune_jobs, is_finetune_job

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, metavar="FILE", help="FineTuneJob YAML file ('-': stdin)")
    parser.add_argument("-o", "--output-dir", metavar="DIR", help="write one file per step into DIR")
    parser.add_argument("--worker-image", help="worker image when spec.image is not set")
    parser.add_argument("--vllm-image", help="vLLM image when spec.serve.image is not set")
    parser.add_argument(
        "--allow-trust-remote-code",
        action="store_true",
        help="accept trust_remote_code / --trust-remote-code (an operator install allows it with "
        "policy.allowTrustRemoteCode)",
    )
    parser.set_defaults(func=run)


def step_files(plan: Plan) -> dict[str, str]:
    """File name -> YAML text, one file per step (``00-shared.yaml`` first)."""
    files = {"00-shared.yaml": to_yaml_documents(plan.shared)}
    for i, step in enumerate(plan.steps, start=1):
        files[f"{i:02d}-{step.name}.yaml"] = to_yaml_documents(step.objects)
    return files


def run(args: argparse.Namespace) -> int:
    try:
        docs = load_documents(args.filename)
    except OSError as exc:
        print(f"ftctl render: cannot read {args.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:
        print(f"{args.filename}: {exc.render()}", file=sys.stderr)
        return EXIT_INVALID
    jobs = finetune_jobs(docs)
    if not jobs:
        # The same exit code as ``ftctl validate`` for the same file: the file is readable, its content is not
        # a FineTuneJob.
        print(f"{args.filename}: no {KIND} found", file=sys.stderr)
        return EXIT_INVALID
    for i, other in enumerate(docs):
        if not is_finetune_job(other):
            print(f"{args.filename}: skipped document {i + 1} ({other.get('kind')!s}): not a {KIND}", file=sys.stderr)
    duplicates = duplicate_names(jobs)
    opts_kw: dict[str, Any] = {}
    if args.worker_image:
        opts_kw["worker_image"] = args.worker_image
    if args.vllm_image:
        opts_kw["vllm_image"] = args.vllm_image
    options = RenderOptions(**opts_kw)
    plans: list[tuple[FineTuneJob, Plan]] = []
    failed = False
    for i, doc in jobs:
        where = args.filename if len(docs) == 1 else f"{args.filename} (document {i + 1})"
        try:
            if i in duplicates:
                raise SpecError(duplicates[i])
            job = validate(doc, Policy(allow_trust_remote_code=args.allow_trust_remote_code))
            plans.append((job, render(job, options)))
        except SpecError as exc:
            print(f"{where}: {exc.render()}", file=sys.stderr)
            failed = True
        except RenderError as exc:
            print(f"{where}: cannot render: {exc}", file=sys.stderr)
            failed = True
    if failed:
        return EXIT_INVALID
    if not args.output_dir:
        sys.stdout.write("".join(to_yaml_documents(p.objects()) for _, p in plans))
        return EXIT_OK
    return _write(Path(args.output_dir), plans)


def _write(out: Path, plans: list[tuple[FineTuneJob, Plan]]) -> int:
    """One folder per job when there are several: ``DIR/<name>/``, or ``DIR/<namespace>/<name>/`` when two jobs
    of the file share a name in different namespaces."""
    names = [job.name for job, _ in plans]
    by_namespace = len(set(names)) != len(names)
    try:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(20, "not a directory")
        for job, plan in plans:
            target = out
            if len(plans) > 1:
                target = out / job.namespace / job.name if by_namespace else out / job.name
            target.mkdir(parents=True, exist_ok=True)
            for fname, text in step_files(plan).items():
                (target / fname).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"ftctl render: cannot write to {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
