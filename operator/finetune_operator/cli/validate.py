"""``ftctl validate -f FILE...``: check FineTuneJob files and print every error with its field path.

Prints ``FILE: ok`` (stdout) for each valid document and ``FILE: <path>: <reason>`` lines (stderr) for each
problem; ``-o json`` prints one JSON report instead (stdout). Exit status: 0 when every document is valid,
1 when any is invalid, 2 on a usage error (no such file, unreadable file).

Documents of other kinds are skipped, so a GitOps folder with ConfigMaps and FineTuneJobs side by side can be
checked (``-f DIR`` reads its ``*.yaml``/``*.yml``/``*.json`` files). A document of our API group with a
misspelled kind is *not* skipped: it is validated, and the kind is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.api.constants import KIND
from finetune_operator.errors import FieldError, SpecError
from finetune_operator.validation import OFFLINE, Policy, check, load_documents
from finetune_operator.validation.files import duplicate_names, finetune_jobs

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


@dataclass
class _Result:
    """One document's outcome (or a whole file's, when it could not be read or parsed)."""

    file: str
    index: int | None
    name: str | None
    errors: list[FieldError] = field(default_factory=list)
    usage_error: str | None = None

    @property
    def status(self) -> int:
        if self.usage_error is not None:
            return EXIT_USAGE
        return EXIT_INVALID if self.errors else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "document": self.index,
            "name": self.name,
            "valid": self.status == EXIT_OK,
        }
        out["errors"] = [{"path": e.path, "message": e.message} for e in self.errors]
        if self.usage_error is not None:
            out["error"] = self.usage_error
        return out


def _check_file(path: str, *, from_dir: bool, policy: Policy = OFFLINE) -> list[_Result]:
    try:
        docs = load_documents(path)
    except OSError as exc:
        return [_Result(path, None, None, usage_error=f"cannot read: {exc.strerror or exc}")]
    except SpecError as exc:
        return [_Result(path, None, None, errors=exc.errors)]
    jobs = finetune_jobs(docs)
    duplicates = duplicate_names(jobs)
    if not jobs:
        # A folder may hold other manifests; a file named explicitly must contain a job.
        return [] if from_dir else [_Result(path, None, None, errors=[FieldError("<file>", f"no {KIND} found")])]
    results = []
    for i, doc in jobs:
        _, errors = check(doc, policy)
        errors = [*duplicates.get(i, []), *errors]
        meta = doc.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) and isinstance(meta.get("name"), str) else None
        results.append(_Result(path, i if len(jobs) > 1 else None, name, errors))
    return results


def _print_text(result: _Result) -> None:
    where = result.file if result.index is None else f"{result.file}[{result.index}]"
    if result.usage_error is not None:
        print(f"{where}: {result.usage_error}", file=sys.stderr)
    elif result.errors:
        n = len(result.errors)
        if result.name is not None:
            print(f"{where}: {KIND} {result.name}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        for err in result.errors:
            print(f"{where}: {err}", file=sys.stderr)
    else:
        print(f"{where}: ok")


def _expand(path: str) -> list[tuple[str, bool]]:
    """A directory stands for its YAML/JSON files (sorted), like ``kubectl apply -f DIR``."""
    p = Path(path)
    if path != "-" and p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".yaml", ".yml", ".json"))
        return [(str(f), True) for f in files]
    return [(path, False)]


def _run(args: argparse.Namespace) -> int:
    results: list[_Result] = []
    for arg in [*args.files, *args.more]:
        for path, from_dir in _expand(arg):
            file_results = _check_file(
                path, from_dir=from_dir, policy=Policy(allow_trust_remote_code=args.allow_trust_remote_code)
            )
            results.extend(file_results)
            if args.output == "text":
                for result in file_results:
                    _print_text(result)
    if args.output == "json":
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    return max((r.status for r in results), default=EXIT_OK)


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
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text", help="report format")
    parser.add_argument(
        "--allow-trust-remote-code",
        action="store_true",
        help="accept trust_remote_code / --trust-remote-code (an operator install allows it with "
        "policy.allowTrustRemoteCode)",
    )
    parser.add_argument("more", nargs="*", metavar="FILE", help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)
