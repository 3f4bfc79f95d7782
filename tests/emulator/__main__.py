"""``python -m tests.emulator``: run the emulator in the foreground (benchmarks, manual kubectl sessions).

Example::

    python -m tests.emulator --kubeconfig /tmp/emu.kubeconfig --crds crds/ &
    KUBECONFIG=/tmp/emu.kubeconfig kubectl get ftj
"""

from __future__ import annotations

import argparse
import signal
import threading

from .runner import EmulatorServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, help="where to write a kubeconfig for the server")
    parser.add_argument("--crds", action="append", default=[], help="CRD file or directory to register (repeatable)")
    parser.add_argument("--namespace", action="append", default=[], help="extra namespace to create (repeatable)")
    parser.add_argument("--request-log", help="write the request log (JSON) here on exit")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmulatorServer() as server:
        for path in args.crds:
            server.apply_crd(path)
        for namespace in args.namespace:
            server.ensure_namespace(namespace)
        server.kubeconfig(args.kubeconfig)
        print(f"emulator listening on {server.url}; kubeconfig: {args.kubeconfig}", flush=True)
        stop.wait()
        if args.request_log:
            server.emulator.dump_request_log(args.request_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
