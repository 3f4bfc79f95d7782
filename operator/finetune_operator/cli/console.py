"""``ftctl console``: serve the web console (see :mod:`finetune_operator.console`).

In the cluster (the chart's ``console.enabled``) it uses its ServiceAccount and talks to models by their
Service DNS names; on a laptop it uses your kubeconfig and reaches models through the API server's Service
proxy (``--via proxy``, the default outside a cluster). Then open http://127.0.0.1:8080.
"""

from __future__ import annotations

import argparse
import os
import sys


def _run(args: argparse.Namespace) -> int:
    import aiohttp.web

    from finetune_operator.access import cluster
    from finetune_operator.console.app import make_app
    from finetune_operator.console.source import ClusterSource, Via

    try:
        access = cluster.from_environment(args.context, args.kubeconfig)
    except cluster.AccessError as exc:
        print(f"ftctl console: {exc}", file=sys.stderr)
        return 1
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not (args.context or args.kubeconfig)
    via: Via = args.via or ("direct" if in_pod else "proxy")
    source = ClusterSource(access=access, namespaces=tuple(args.namespace or ()), via=via)
    print(f"console on http://{args.host}:{args.port} (API {access.server}, models via {via})", file=sys.stderr)
    aiohttp.web.run_app(make_app(source), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "-n", "--namespace", action="append", help="show only this namespace (repeatable; default: all)"
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    parser.add_argument(
        "--via",
        choices=("direct", "proxy"),
        help="reach models by Service DNS (direct, in a cluster) or through the API server (proxy)",
    )
    parser.set_defaults(func=_run)
