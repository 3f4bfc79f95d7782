"""The API server's Service proxy (``/api/v1/namespaces/NS/services/NAME[:PORT]/proxy/PATH``), emulated.

A real API server forwards such a request to one ready endpoint of the Service (this is what
``kubectl proxy``, ``ftctl chat --job`` and a console outside the cluster use to reach a Service without
network access to the pod network). Here the test plays kube-proxy and the Endpoints controller: it registers
where a Service's port answers (``emulator.service_backends[(ns, name, port)] = 'http://127.0.0.1:N'``).

Semantics kept from the real server: the Service object must exist (404 ``NotFound`` otherwise); a port must
be one the Service declares (by name or number; the only port when none is named); a Service without a
registered backend answers 503 ``ServiceUnavailable`` ("no endpoints available"), as one without ready pods
does; the request is authorised as the ``services/proxy`` subresource (``get`` for GET, ``create`` for POST);
the response is streamed back as it arrives (server-sent events keep working).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import aiohttp.web

from .errors import ApiError

PROXY_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/services/(?P<svc>[^/]+)/proxy(?P<rest>/.*)?$")
#: Hop-by-hop headers (RFC 9110 §7.6.1) and what aiohttp sets itself: not forwarded.
_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "authorization",
    "proxy-authorization",
}


def match(path: str) -> re.Match[str] | None:
    return PROXY_PATH.match(path)


def proxy_verb(method: str) -> str:
    return {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


def _port_key(service: Mapping[str, Any], wanted: str | None) -> str:
    """The port the request names (``name:port`` in the URL), checked against the Service's ports."""
    ports = (service.get("spec") or {}).get("ports") or []
    if wanted is None:
        if len(ports) != 1:
            raise ApiError(
                503, "ServiceUnavailable", f"no port named in the proxy URL and the Service has {len(ports)} ports"
            )
        return str(ports[0].get("port"))
    for p in ports:
        if wanted in (str(p.get("port")), str(p.get("name"))):
            return str(p.get("port"))
    raise ApiError(503, "ServiceUnavailable", f"no service port {wanted!r} found for service")


async def forward(
    raw: aiohttp.web.BaseRequest,
    m: re.Match[str],
    service: Mapping[str, Any] | None,
    backends: Mapping[tuple[str, str, str], str],
    body: bytes,
) -> aiohttp.web.StreamResponse:
    ns, svc_port, rest = m["ns"], m["svc"], m["rest"] or "/"
    name, _, port = svc_port.partition(":")
    if service is None:
        raise ApiError(404, "NotFound", f'services "{name}" not found', {"name": name, "kind": "services"})
    key = (ns, name, _port_key(service, port or None))
    target = backends.get(key)
    if target is None:
        raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
    url = target.rstrip("/") + rest
    headers = {k: v for k, v in raw.headers.items() if k.lower() not in _HOP}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            upstream = await session.request(raw.method, url, params=raw.query, data=body or None, headers=headers)
        except aiohttp.ClientError as e:
            raise ApiError(503, "ServiceUnavailable", f"error trying to reach service: {e}") from None
        async with upstream:
            response = aiohttp.web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP:
                    response.headers[k] = v
            await response.prepare(raw)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
