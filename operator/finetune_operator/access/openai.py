"""The OpenAI-compatible chat protocol vLLM serves, streaming, without a client library.

``POST {base}/chat/completions`` with ``"stream": true`` answers server-sent events: ``data: {json}`` lines
whose ``choices[0].delta.content`` carry the text, ending with ``data: [DONE]``. :class:`SSEDecoder` turns
bytes as they arrive (any chunking) into text pieces; :func:`stream_chat` does one request with urllib for the
terminal chat; the console feeds the same decoder from aiohttp.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .cluster import AccessError, api_error_message


class ChatError(AccessError):
    """The model server refused or broke off a chat; the message is the server's, or says what failed."""


class SSEDecoder:
    """Feed bytes, get the text deltas they complete. ``done`` turns true at ``data: [DONE]``."""

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while b"\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n", 1)
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if not line.startswith("data:"):
                continue  # blank separators, comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                raise ChatError(f"the model server sent a malformed event: {data[:200]}") from None
            if isinstance(event, Mapping) and isinstance(event.get("error"), Mapping):
                raise ChatError(f"the model server reported an error: {event['error'].get('message')}")
            for choice in event.get("choices") or [] if isinstance(event, Mapping) else []:
                piece = ((choice or {}).get("delta") or {}).get("content")
                if isinstance(piece, str) and piece:
                    out.append(piece)
        return out


def chat_request(
    model: str, messages: Sequence[Mapping[str, str]], max_tokens: int | None = None, temperature: float | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def error_message(body: bytes, code: int) -> str:
    """vLLM's ``{"error": {"message"}}``, an OpenAI-style ``{"message"}`` or a Kubernetes Status."""
    try:
        doc = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        doc = None
    if isinstance(doc, Mapping) and isinstance(doc.get("error"), Mapping):
        return f"{doc['error'].get('message')} (HTTP {code})"
    return api_error_message(body, code)


def stream_chat(
    base_url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 300.0,
) -> Iterator[str]:
    """POST a streaming chat completion to ``base_url`` (ending in ``/v1``); yields text pieces as they come."""
    url = base_url.rstrip("/") + "/chat/completions"
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})},
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout, context=ssl_context)
    except urllib.error.HTTPError as exc:
        raise ChatError(f"{url}: {error_message(exc.read(), exc.code)}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ChatError(f"cannot reach the model at {base_url}: {getattr(exc, 'reason', exc)}") from None
    decoder = SSEDecoder()
    with resp:
        while not decoder.done:
            try:
                chunk = resp.read1(65536)
            except OSError as exc:
                raise ChatError(f"the connection to {base_url} broke off: {exc}") from None
            if not chunk:
                break
            yield from decoder.feed(chunk)
    if not decoder.done:
        raise ChatError(f"the model at {base_url} ended the answer without [DONE]")
