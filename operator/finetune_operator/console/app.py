"""The console's routes: pages, a JSON view of one job for live refresh, and the streaming chat proxy.

Safety of the chat route: it only accepts ``application/json`` bodies (a cross-site form cannot send one
without a CORS preflight, which this server never grants), checks ``Origin`` against ``Host`` when a browser
sends one, and bounds what it forwards (message count and size, ``max_tokens``). The model address is derived
from the job's name (see :mod:`finetune_operator.access.jobs`), never taken from the request or from status.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import jinja2

from finetune_operator.access.cluster import AccessError
from finetune_operator.access.jobs import NotServing, serving
from finetune_operator.access.openai import ChatError, chat_request

from . import views
from .source import ClusterSource

HERE = Path(__file__).parent
SOURCE_KEY = aiohttp.web.AppKey("source", ClusterSource)
ENV_KEY = aiohttp.web.AppKey("env", jinja2.Environment)
MAX_MESSAGES = 50
MAX_CONTENT = 32 * 1024
MAX_TOKENS = 2048
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

#: Pages and scripts only from this server; no framing (click-jacking), no MIME sniffing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _page(request: aiohttp.web.Request, template: str, status: int = 200, **context: Any) -> aiohttp.web.Response:
    html = request.app[ENV_KEY].get_template(template).render(**context)
    return aiohttp.web.Response(text=html, content_type="text/html", charset="utf-8", status=status)


def _names(request: aiohttp.web.Request) -> tuple[str, str]:
    ns, name = request.match_info["namespace"], request.match_info["name"]
    if not _NAME.match(ns) or not _NAME.match(name):
        raise AccessError(f"not a valid namespace/name: {ns!r}/{name!r}", 404)
    return ns, name


async def index(request: aiohttp.web.Request) -> aiohttp.web.Response:
    try:
        jobs = await request.app[SOURCE_KEY].list_jobs()
    except AccessError as exc:
        return _page(request, "error.html", status=502, title="Cannot list FineTuneJobs", message=str(exc))
    return _page(request, "index.html", rows=[views.row(j) for j in jobs])


async def job_page(request: aiohttp.web.Request) -> aiohttp.web.Response:
    try:
        ns, name = _names(request)
        job = await request.app[SOURCE_KEY].get_job(ns, name)
    except AccessError as exc:
        code = 404 if exc.status == 404 else 502
        return _page(request, "error.html", status=code, title="FineTuneJob not available", message=str(exc))
    return _page(request, "job.html", job=views.detail(job))


async def job_json(request: aiohttp.web.Request) -> aiohttp.web.Response:
    try:
        ns, name = _names(request)
        job = await request.app[SOURCE_KEY].get_job(ns, name)
    except AccessError as exc:
        return aiohttp.web.json_response({"error": str(exc)}, status=404 if exc.status == 404 else 502)
    return aiohttp.web.json_response(views.detail(job))


def _chat_body(data: Any, model: str) -> dict[str, Any]:
    """The request forwarded to vLLM, from what the page sent; ValueError names what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("send a JSON object with a 'messages' list")
    messages = data["messages"]
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise ValueError(f"between 1 and {MAX_MESSAGES} messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}]: role must be system, user or assistant")
        content = m.get("content")
        if not isinstance(content, str) or len(content) > MAX_CONTENT:
            raise ValueError(f"messages[{i}]: content must be a string of at most {MAX_CONTENT} characters")
        clean.append({"role": m["role"], "content": content})
    max_tokens = data.get("max_tokens", 256)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}")
    return chat_request(model, clean, max_tokens)


async def chat(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
    def refuse(status: int, message: str) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"error": message}, status=status)

    if request.content_type != "application/json":
        return refuse(415, "the chat takes application/json")
    origin = request.headers.get("Origin")
    if origin is not None and origin.split("://", 1)[-1] != request.host:
        return refuse(403, "cross-origin chat requests are refused")
    source = request.app[SOURCE_KEY]
    try:
        ns, name = _names(request)
        target = serving(await source.get_job(ns, name))
    except NotServing as exc:
        return refuse(409, str(exc))
    except AccessError as exc:
        return refuse(404 if exc.status == 404 else 502, str(exc))
    try:
        body = _chat_body(await request.json(), target.model)
    except ValueError as exc:
        return refuse(400, str(exc))
    pieces = source.stream_chat(target, body)
    try:
        first = await anext(pieces, "")
    except ChatError as exc:
        return refuse(502, str(exc))
    response = aiohttp.web.StreamResponse(
        headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    await response.write(first.encode())
    try:
        async for piece in pieces:
            await response.write(piece.encode())
    except ChatError as exc:  # after the first piece the status is sent: say it in the stream
        await response.write(f"\n[error: {exc}]".encode())
    await response.write_eof()
    return response


async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
    return aiohttp.web.Response(text="ok")


@aiohttp.web.middleware
async def security_headers(
    request: aiohttp.web.Request, handler: Callable[[aiohttp.web.Request], Awaitable[aiohttp.web.StreamResponse]]
) -> aiohttp.web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


def make_app(source: ClusterSource) -> aiohttp.web.Application:
    app = aiohttp.web.Application(middlewares=[security_headers], client_max_size=MAX_MESSAGES * MAX_CONTENT + 65536)
    app[SOURCE_KEY] = source
    app[ENV_KEY] = _env()
    app.router.add_get("/", index)
    app.router.add_get("/jobs/{namespace}/{name}", job_page)
    app.router.add_get("/api/jobs/{namespace}/{name}", job_json)
    app.router.add_post("/api/jobs/{namespace}/{name}/chat", chat)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", HERE / "static", show_index=False)
    return app
