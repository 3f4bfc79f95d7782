"""``ftctl plot``: write a loss curve as a PNG.

``--stage DIR`` reads a stage folder's trainer log (a local run, or a copy of the output volume);
``--job NAME`` reads the loss history the operator keeps in the job's status (one curve per training stage),
with your kubeconfig as kubectl uses it, so no access to the volume is needed.
"""

from __future__ import annotations

import argparse
import sys


def _job_series(args: argparse.Namespace) -> dict[str, list[tuple[int, float]]]:
    from finetune_operator.access import cluster, jobs

    access = cluster.from_kubeconfig(args.context, args.kubeconfig)
    job = cluster.get_job(access, args.namespace or access.namespace, args.job)
    series = {
        name: [(p.step, p.loss) for p in points if p.loss is not None] for name, points in jobs.histories(job).items()
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError(f'FineTuneJob "{args.job}" has no loss history yet (no training stage has reported)')
    return series


def _run(args: argparse.Namespace) -> int:
    from finetune_operator.access.cluster import AccessError
    from finetune_operator.local.plot import plot_loss, plot_series

    if bool(args.stage) == bool(args.job):
        print("ftctl plot: give exactly one of --stage DIR or --job NAME", file=sys.stderr)
        return 2
    try:
        if args.stage:
            out = plot_loss(args.stage, args.output, title=args.title)
        else:
            out = plot_series(_job_series(args), args.output, args.title or f"{args.job}: training loss")
    except (FileNotFoundError, ValueError, AccessError) as exc:
        print(f"ftctl plot: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", metavar="DIR", help="a training stage's output folder")
    parser.add_argument("--job", metavar="NAME", help="a FineTuneJob: plot the loss history from its status")
    parser.add_argument("-n", "--namespace", help="namespace of the job (default: the kubeconfig context's)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    parser.add_argument("-o", "--output", default="loss.png", help="PNG file to write (default loss.png)")
    parser.add_argument("--title", help="plot title")
    parser.set_defaults(func=_run)
