"""``ftctl validate -f FILE...``: check FineTuneJob files and print every error with its field path.

Prints ``FILE: ok`` (stdout) for each valid file and ``FILE: <path>: <reason>`` lines (stderr) for each
problem. Exit status: 0 when every document is valid, 1 when any is invalid, 2 on a usage error (no such
file, unreadable file). Documents of other kinds in the same file are skipped, so a whole GitOps folder
with ConfigMaps and FineTuneJobs side by side can be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_operator.api.constants import KIND
from finetune_operator.errors import SpecError
from finetune_operator.validation import check, load_documents

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _validate_file(path: str) -> int:
    try:
        docs = load_documents(path)
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnicodeDecodeError:
        print(f"{path}: cannot read: not UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:
        for err in exc.errors:
            print(f"{path}: {err}", file=sys.stderr)
        return EXIT_INVALID
    jobs = [(i, d) for i, d in enumerate(docs) if d.get("kind", KIND) == KIND]
    if not jobs:
        print(f"{path}: no {KIND} found", file=sys.stderr)
        return EXIT_INVALID
    status = EXIT_OK
    for i, doc in jobs:
        _, errors = check(doc)
        where = path if len(jobs) == 1 else f"{path}[{i}]"
        if errors:
            status = EXIT_INVALID
            name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
            print(
                f"{where}: {KIND} {name or '<unnamed>'}: {len(errors)} error{'s' if len(errors) != 1 else ''}",
                file=sys.stderr,
            )
            for err in errors:
                print(f"{where}: {err}", file=sys.stderr)
        else:
            print(f"{where}: ok")
    return status


def _expand(path: str) -> list[str]:
    """A directory stands for its YAML/JSON files (sorted), like ``kubectl apply -f DIR``."""
    p = Path(path)
    if path != "-" and p.is_dir():
        return [str(f) for f in sorted(p.iterdir()) if f.is_file() and f.suffix in (".yaml", ".yml", ".json")]
    return [path]


def _run(args: argparse.Namespace) -> int:
    worst = EXIT_OK
    for arg in args.files:
        for path in _expand(arg):
            worst = max(worst, _validate_file(path))
    return worst


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="FineTuneJob YAML file or directory (multi-document allowed; '-' reads stdin); repeatable",
    )
    parser.add_argument("more", nargs="*", metavar="FILE", help=argparse.SUPPRESS)
    parser.set_defaults(func=_run_all)


def _run_all(args: argparse.Namespace) -> int:
    args.files = [*args.files, *args.more]
    return _run(args)
