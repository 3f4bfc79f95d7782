"""``ftctl run -f job.yaml --local``: run a FineTuneJob on this machine with the same worker code as the pods.

``--demo`` needs no file: it creates a tiny model and datasets in the workdir and runs the bundled demo job
(SFT on sharegpt + alpaca data, DPO on top, merge) on CPU in about a minute.

Exit codes: 0 done, 1 invalid spec, 2 usage, and a failed step's worker exit code (3 bad data, 4 model
missing, 6 out of memory, 7 training failed, 9 evaluation failed, 10 publishing failed, 11 the promotion gate
refused the model (nothing served or published), 128+N interrupted by signal N: run again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from finetune_operator.api.constants import KIND
from finetune_operator.errors import FineTuneError, SpecError, WorkerError

EXIT_INVALID, EXIT_USAGE = 1, 2


def _run(args: argparse.Namespace) -> int:
    from finetune_operator.local.runner import LocalOptions, parse_volumes, run_local, serve_local
    from finetune_operator.validation import Policy, load_documents, validate
    from finetune_operator.validation.files import finetune_jobs

    console = Console(stderr=True, soft_wrap=True)  # paths stay on one line (copyable)
    if not args.local:
        console.print("ftctl run: only --local is supported (on a cluster: kubectl apply -f, or ftctl render)")
        return EXIT_USAGE
    workdir = Path(args.workdir or ("demo-workdir" if args.demo else "finetune-workdir"))
    if workdir.exists() and not workdir.is_dir():
        console.print(f"ftctl run: --workdir {workdir} is not a directory")
        return EXIT_USAGE
    if args.demo:
        if args.file:
            console.print("ftctl run: give either --demo or -f FILE")
            return EXIT_USAGE
        from finetune_operator.local.demo import prepare_demo

        with console.status("creating the tiny demo model and datasets"):
            spec_path = prepare_demo(workdir)
        console.print(f"demo: model, data and spec in {workdir} ({spec_path.name})")
        files = [str(spec_path)]
    elif args.file:
        files = [args.file]
    else:
        console.print("ftctl run: -f FILE (or --demo) is required")
        return EXIT_USAGE
    try:
        volumes = parse_volumes(args.volume or [])
    except ValueError as exc:
        console.print(f"ftctl run: {exc}")
        return EXIT_USAGE
    if args.nproc is not None and args.nproc < 1:
        console.print("ftctl run: --nproc must be at least 1")
        return EXIT_USAGE
    try:
        docs = [d for _, d in finetune_jobs(load_documents(files[0]))]
        if not docs:
            console.print(f"ftctl run: {files[0]}: no {KIND} found")
            return EXIT_INVALID
        if len(docs) != 1:
            console.print(f"ftctl run: {files[0]} must hold exactly one {KIND} (found {len(docs)})")
            return EXIT_INVALID
        job = validate(docs[0], Policy(allow_trust_remote_code=args.allow_trust_remote_code))
    except OSError as exc:
        console.print(f"ftctl run: cannot read {files[0]}: {exc.strerror or exc}")
        return EXIT_USAGE
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_INVALID
    secrets_dir = Path(args.secrets_dir) if args.secrets_dir else None
    if secrets_dir is not None and not secrets_dir.is_dir():
        console.print(f"ftctl run: --secrets-dir {secrets_dir} is not a folder")
        return EXIT_USAGE
    opts = LocalOptions(
        workdir=workdir, volumes=volumes, nproc=args.nproc, vllm=args.vllm, smoke=args.smoke, secrets_dir=secrets_dir
    )
    try:
        result = run_local(job, opts, console)
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_INVALID
    except WorkerError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return exc.exit_code
    except FineTuneError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_INVALID
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume from the last checkpoint")
        return 130
    except OSError as exc:  # a volume folder that cannot be created or written (read-only, a file in the way)
        where = f": {exc.filename}" if exc.filename else ""
        console.print(f"[red]error:[/red] {escape(str(exc.strerror or exc))}{escape(where)}", highlight=False)
        return EXIT_USAGE
    if "serve" in result.deferred and not args.no_serve:
        return serve_local(job, opts, result, console)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", help="FineTuneJob YAML")
    parser.add_argument("--local", action="store_true", help="run on this machine (the only mode)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="create a tiny model and datasets in the workdir and run the bundled demo job",
    )
    parser.add_argument(
        "--workdir", help="local root of the volumes: <workdir>/<claimName> (default ./finetune-workdir)"
    )
    parser.add_argument(
        "--volume", action="append", metavar="CLAIM=DIR", help="use DIR for PersistentVolumeClaim CLAIM (repeatable)"
    )
    parser.add_argument("--nproc", type=int, help="training processes per stage through torchrun (CPU: gloo)")
    parser.add_argument(
        "--vllm", metavar="CMD", help="command that starts vLLM for the serve stage (default: vllm serve)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="two steps per stage, and a one-request smoke test of the served model"
    )
    parser.add_argument("--no-serve", action="store_true", help="stop after training and merging")
    parser.add_argument(
        "--allow-trust-remote-code",
        action="store_true",
        help="accept trust_remote_code / --trust-remote-code (an operator install allows it with "
        "policy.allowTrustRemoteCode)",
    )
    parser.add_argument(
        "--secrets-dir",
        metavar="DIR",
        help="Secrets as files DIR/<secret>/<key> (like a projected Secret volume), for publishing credentials",
    )
    parser.set_defaults(func=_run)
