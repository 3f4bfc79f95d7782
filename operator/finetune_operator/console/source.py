"""Where the console reads FineTuneJobs and how it reaches their models (the only I/O besides HTTP serving)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from finetune_operator.access.cluster import (
    GROUP,
    PLURAL,
    VERSION,
    AccessError,
    ClusterAccess,
    api_error_message,
    as_job,
    job_lookup,
    job_path,
)
from finetune_operator.access.jobs import Serving
from finetune_operator.access.openai import ChatError, SSEDecoder, error_message

Via = Literal["direct", "proxy"]


@dataclass
class ClusterSource:
    """Reads jobs with the console's credentials; talks to models directly or through the Service proxy."""

    access: ClusterAccess
    namespaces: Sequence[str] = ()
    """Only these namespaces (the chart's namespaced mode); empty: every namespace (a cluster-wide list)."""
    via: Via = "direct"
    timeout: float = 30.0

    def _session(self, timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
        ssl_ctx = self.access.ssl_context()
        connector = aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx is not None else None
        return aiohttp.ClientSession(
            headers=self.access.headers,
            connector=connector,
            timeout=timeout or aiohttp.ClientTimeout(total=self.timeout),
        )

    async def _get(self, path: str) -> Any:
        try:
            async with self._session() as session, session.get(self.access.url(path)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise AccessError(api_error_message(body, resp.status), resp.status)
                return json.loads(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AccessError(f"cannot reach the Kubernetes API at {self.access.server}: {exc}") from None

    async def list_jobs(self) -> list[dict[str, Any]]:
        if self.namespaces:
            items: list[dict[str, Any]] = []
            for ns in self.namespaces:
                items.extend((await self._get(job_path(ns))).get("items") or [])
        else:
            items = (await self._get(f"/apis/{GROUP}/{VERSION}/{PLURAL}")).get("items") or []
        return sorted(items, key=lambda o: ((o.get("metadata") or {}).get("namespace", ""), o["metadata"]["name"]))

    async def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        if self.namespaces and namespace not in self.namespaces:
            raise AccessError(f'namespace "{namespace}" is not one this console shows', 404)
        with job_lookup(namespace, name):
            return as_job(await self._get(job_path(namespace, name)), namespace, name)

    def model_base(self, serving: Serving) -> str:
        if self.via == "proxy":
            return self.access.service_proxy(serving.namespace, serving.service, serving.port) + "/v1"
        return serving.in_cluster_base

    async def stream_chat(self, serving: Serving, body: Mapping[str, Any]) -> AsyncIterator[str]:
        """The model's answer, piece by piece. Errors before the first piece raise :class:`ChatError`."""
        url = self.model_base(serving) + "/chat/completions"
        headers = self.access.headers if self.via == "proxy" else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        try:
            async with (
                aiohttp.ClientSession(
                    headers=headers,
                    timeout=timeout,
                    connector=aiohttp.TCPConnector(ssl=self.access.ssl_context() or False)
                    if self.via == "proxy"
                    else None,
                ) as session,
                session.post(url, json=dict(body), headers={"Accept": "text/event-stream"}) as resp,
            ):
                if resp.status != 200:
                    raise ChatError(f"the model server answered: {error_message(await resp.read(), resp.status)}")
                decoder = SSEDecoder()
                async for chunk in resp.content.iter_any():
                    for piece in decoder.feed(chunk):
                        yield piece
                    if decoder.done:
                        return
                if not decoder.done:
                    raise ChatError("the model server ended the answer early")
        except (aiohttp.ClientError, TimeoutError) as exc:
            where = urllib.parse.urlsplit(url).netloc
            raise ChatError(f"cannot reach the model server ({where}): {exc}") from None
