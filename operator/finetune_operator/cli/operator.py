"""``ftctl operator``: run the kopf operator in this process.

Equivalent to ``kopf run -m finetune_operator.controller.handlers --standalone``, plus our flags. One replica
is meant to run (Deployment strategy Recreate): the reconciler is safe against a second one (deterministic
names, optimistic status writes), but two would do every API call twice. ``--standalone`` disables kopf's
peering, which would need its own CRD.
"""

from __future__ import annotations

import argparse
import logging
import os

EXIT_OK = 0


def register(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; glob patterns as in kopf); default: all namespaces",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve kopf's liveness probe at http://0.0.0.0:PORT/healthz",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (also FT_METRICS_PORT)",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument(
        "--resync-seconds", type=float, default=None, help="full resync period (FT_RESYNC_SECONDS, default 60)"
    )
    parser.add_argument(
        "--drift-seconds",
        type=float,
        default=None,
        help="period of drift checks against the API server (FT_DRIFT_SECONDS, default 300)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=None,
        help="minimum seconds between progress-only status writes per job (FT_PROGRESS_INTERVAL_SECONDS, default 10)",
    )
    parser.add_argument("--workers", type=int, default=None, help="concurrent reconciles (FT_RECONCILE_WORKERS)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="log everything (kopf's debug output included)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        # The login (kopf's, shared by the operator's client) reads $KUBECONFIG. Set before kopf is imported:
        # the optional plugin-aware loader (kubernetes_asyncio) reads it once, at import.
        os.environ["KUBECONFIG"] = args.kubeconfig

    import kopf

    from finetune_operator.controller import handlers
    from finetune_operator.controller.runtime import OperatorConfig

    config = OperatorConfig.from_env(
        kubeconfig=args.kubeconfig,
        metrics_port=args.metrics_port,
        resync_interval=args.resync_seconds,
        drift_interval=args.drift_seconds,
        progress_interval=args.progress_interval,
        workers=args.workers,
    )
    kopf.configure(verbose=args.verbose, debug=args.debug)
    if not (args.verbose or args.debug):
        logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("finetune_operator").setLevel(logging.DEBUG if args.debug else logging.INFO)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    namespaces = list(args.namespace)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
        memo=kopf.Memo({handlers.MEMO_CONFIG: config}),
    )
    return EXIT_OK
