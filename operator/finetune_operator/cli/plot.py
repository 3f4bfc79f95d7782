"""``ftctl plot --stage DIR -o loss.png``: write a stage's loss curve (from its trainer log) as a PNG."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from finetune_operator.local.plot import plot_loss

    try:
        out = plot_loss(args.stage, args.output, title=args.title)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ftctl plot: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, metavar="DIR", help="a training stage's output folder")
    parser.add_argument("-o", "--output", default="loss.png", help="PNG file to write (default loss.png)")
    parser.add_argument("--title", help="plot title")
    parser.set_defaults(func=_run)
