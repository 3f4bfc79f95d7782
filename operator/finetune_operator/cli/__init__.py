"""``ftctl``: validate, render and run FineTuneJobs; run the operator and the worker.

Each subcommand lives in its own module under :mod:`finetune_operator.cli` and exposes
``register(subparsers)``. Modules are imported lazily by name so that ``ftctl validate`` never pays for
importing kopf, and ``ftctl render`` never needs torch.

Exit codes: 0 ok, 1 invalid spec (or a failed pipeline step), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from finetune_operator import __version__

#: (subcommand, module under finetune_operator.cli, one-line help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("validate", "validate", "check FineTuneJob files and print every error with its field path"),
    ("render", "render", "render every manifest of a FineTuneJob's pipeline (offline, deterministic)"),
    ("crd", "crd", "print the FineTuneJob CustomResourceDefinition generated from the API types"),
    ("plan", "plan", "estimate per-GPU memory, check the data, count steps and time for every stage"),
    ("run", "run", "run a FineTuneJob on this machine (--local) with the same worker code"),
    ("plot", "plot", "write a stage's loss curve as a PNG (from a stage folder or a job's status)"),
    ("chat", "chat", "chat with a FineTuneJob's served model in the terminal (streaming)"),
    ("console", "console", "serve the web console: jobs, loss curves, chat playground"),
    ("lineage", "lineage", "print a model's finetune-lineage.json (where it came from)"),
    ("operator", "operator", "run the kopf operator"),
    ("worker", "worker", "run one pipeline step inside a pod (download, train, merge, eval, publish)"),
)

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # pragma: no cover - argparse plumbing
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the module of the subcommand named in ``argv`` is imported."""
    parser = _Parser(prog="ftctl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ftctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module, help_text in COMMANDS:
        if wanted is not None and wanted != name:
            # Only import the module of the command being run; others get a bare entry for --help.
            sub.add_parser(name, help=help_text)
            continue
        try:
            mod = importlib.import_module(f"finetune_operator.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("finetune_operator.cli"):
                sub.add_parser(name, help=f"{help_text} (not available)")
                continue
            raise
        mod.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(func(args) or 0)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
