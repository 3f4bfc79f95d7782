"""``ftctl chat``: talk to a FineTuneJob's served model from the terminal, the answer streamed as it comes.

``--job NAME`` reaches the model through the API server's Service proxy with your kubeconfig (so it works from
a laptop, and only for Services you may reach); ``--endpoint URL`` talks to any OpenAI-compatible server
directly (``ftctl run --local --vllm``, or ``kubectl port-forward svc/NAME-serve 8000``). Without
``--prompt`` it is an interactive session that keeps the conversation (``/reset`` forgets it, ``/exit`` or
Ctrl-D ends it, Ctrl-C stops one answer); with ``--prompt`` it answers once and exits, for scripts.

Exit codes: 0 answered, 1 the job does not serve (yet) or the model failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from finetune_operator.access.cluster import AccessError


@dataclass
class Target:
    """Where to send chat requests."""

    base_url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    ssl: ssl.SSLContext | None = None
    label: str = ""


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _only_model(base_url: str) -> str:
    """The one model an endpoint serves (``GET /v1/models``); an error naming them when there are several."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=30) as resp:
            ids = [m.get("id") for m in json.loads(resp.read()).get("data") or []]
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
        raise AccessError(f"cannot list the models at {base_url}: {getattr(exc, 'reason', exc)}") from None
    ids = [i for i in ids if isinstance(i, str)]
    if len(ids) != 1:
        raise AccessError(f"{base_url} serves {len(ids)} models ({', '.join(ids) or 'none'}): pick one with --model")
    return str(ids[0])


def resolve(args: argparse.Namespace) -> Target:
    if args.endpoint:
        base = _base(args.endpoint)
        return Target(base_url=base, model=args.model or _only_model(base), label=base)
    from finetune_operator.access import cluster, jobs

    access = cluster.from_kubeconfig(args.context, args.kubeconfig)
    namespace = args.namespace or access.namespace
    job = cluster.get_job(access, namespace, args.job)
    serving = jobs.serving(job)
    base = access.service_proxy(serving.namespace, serving.service, serving.port) + "/v1"
    return Target(
        base_url=base,
        model=args.model or serving.model,
        headers=dict(access.headers),
        ssl=access.ssl_context(),
        label=f"{namespace}/{args.job}",
    )


def _answer(
    target: Target, messages: list[dict[str, str]], args: argparse.Namespace, write: Callable[[str], object]
) -> str:
    from finetune_operator.access.openai import chat_request, stream_chat

    body = chat_request(target.model, messages, args.max_tokens, args.temperature)
    pieces: list[str] = []
    for piece in stream_chat(target.base_url, body, target.headers, target.ssl):
        pieces.append(piece)
        write(piece)
        sys.stdout.flush()
    return "".join(pieces)


def _interactive(target: Target, args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):  # line editing and history for input(), where available
        import readline  # noqa: F401
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"chatting with {target.model} ({target.label}); /reset forgets, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _answer(target, system + history, args, sys.stdout.write)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            history.pop()
            continue
        except AccessError as exc:
            print(f"\nftctl chat: {exc}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def _run(args: argparse.Namespace) -> int:
    if bool(args.job) == bool(args.endpoint):
        print("ftctl chat: give exactly one of --job NAME or --endpoint URL", file=sys.stderr)
        return 2
    try:
        target = resolve(args)
    except AccessError as exc:
        print(f"ftctl chat: {exc}", file=sys.stderr)
        return 1
    if args.prompt is None:
        return _interactive(target, args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    try:
        _answer(target, messages, args, sys.stdout.write)
    except AccessError as exc:
        print(f"\nftctl chat: {exc}", file=sys.stderr)
        return 1
    print()
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", metavar="NAME", help="a FineTuneJob that serves (reached through the API server)")
    parser.add_argument("-n", "--namespace", help="namespace of the job (default: the kubeconfig context's)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    parser.add_argument(
        "--endpoint", metavar="URL", help="an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--model", help="model name (default: the job's servedModelName, or the endpoint's only model)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--prompt", help="answer this one prompt and exit ('-' reads it from standard input)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")
    parser.set_defaults(func=_run)
