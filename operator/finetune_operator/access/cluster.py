"""The API server's address and credentials, as kubectl finds them, plus small JSON GETs.

Why not a generated client: the callers need three requests (get a FineTuneJob, list them, POST through a
Service proxy and stream the answer). Loading the credentials is the hard part (kubeconfig merging, contexts,
exec plugins, client certificates, in-cluster tokens), and kubernetes_asyncio's public loaders do exactly that;
the requests themselves are plain HTTPS with the same TLS settings and bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where a pod's ServiceAccount token is mounted (the console runs in-cluster).
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


class AccessError(Exception):
    """The cluster cannot be reached or refused a request; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClusterAccess:
    """Where the API server is and how to authenticate: enough for plain HTTPS requests."""

    server: str
    """Base URL of the API server (``https://host:port``)."""
    namespace: str = "default"
    """The namespace of the kubeconfig context (or of the pod), used when none is given."""
    headers: dict[str, str] = field(default_factory=dict)
    """Authorization header, when a token is used."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS settings for ``https`` servers (None for plain ``http``)."""
        if not self.server.startswith("https:"):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        q = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self.server.rstrip('/')}{path}{q}"

    def service_proxy(self, namespace: str, service: str, port: int | str) -> str:
        """Base URL of a Service's port through the API server's proxy."""
        ns, svc = urllib.parse.quote(namespace, safe=""), urllib.parse.quote(service, safe="")
        return self.url(f"/api/v1/namespaces/{ns}/services/{svc}:{port}/proxy")

    def get_json(self, path: str, query: dict[str, str] | None = None, timeout: float = 30.0) -> Any:
        """GET ``path`` and decode its JSON; API errors become :class:`AccessError` with the server's message."""
        req = urllib.request.Request(self.url(path, query), headers={"Accept": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise AccessError(api_error_message(exc.read(), exc.code), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AccessError(f"cannot reach the Kubernetes API at {self.server}: {reason}") from None
        except ValueError as exc:
            raise AccessError(f"the Kubernetes API at {self.server} answered with invalid JSON: {exc}") from None


def api_error_message(body: bytes, code: int) -> str:
    """The ``message`` of a Kubernetes Status body, else the body's start."""
    text = body.decode("utf-8", "replace")
    try:
        status = json.loads(text)
    except ValueError:
        status = None
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return f"{status['message']} (HTTP {code})"
    return f"HTTP {code}: {text[:300].strip()}"


def from_kubeconfig(context: str | None = None, kubeconfig: str | None = None) -> ClusterAccess:
    """Credentials from a kubeconfig: ``kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``, like kubectl."""
    from kubernetes_asyncio import config as kconfig
    from kubernetes_asyncio.client import Configuration

    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    path = os.path.expanduser(path or "~/.kube/config")
    if not Path(path).is_file():
        raise AccessError(f"no kubeconfig at {path} (set KUBECONFIG or pass --kubeconfig)")
    cfg = Configuration()
    try:
        asyncio.run(
            kconfig.load_kube_config(config_file=path, context=context, client_configuration=cfg, persist_config=False)
        )
        contexts, active = kconfig.list_kube_config_contexts(path)
    except Exception as exc:  # the loader raises ConfigException and friends: report, never a traceback
        raise AccessError(f"cannot use kubeconfig {path}: {exc}") from None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    if not cfg.host:
        raise AccessError(f"kubeconfig {path}: the context names no cluster server")
    token = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
    headers = {"Authorization": token} if token else {}
    return ClusterAccess(
        server=cfg.host,
        namespace=namespace,
        headers=headers,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        verify=bool(cfg.verify_ssl),
    )


def in_cluster(sa_dir: Path = SA_DIR) -> ClusterAccess:
    """Credentials of the pod's ServiceAccount (read on each call: projected tokens rotate)."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise AccessError("not in a cluster: KUBERNETES_SERVICE_HOST is not set")
    try:
        token = (sa_dir / "token").read_text(encoding="utf-8").strip()
        namespace = (sa_dir / "namespace").read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AccessError(f"no ServiceAccount token in {sa_dir}: {exc.strerror}") from None
    host = f"[{host}]" if ":" in host else host
    return ClusterAccess(
        server=f"https://{host}:{port}",
        namespace=namespace or "default",
        headers={"Authorization": f"Bearer {token}"},
        ca_file=str(sa_dir / "ca.crt"),
    )


def from_environment(context: str | None = None, kubeconfig: str | None = None) -> ClusterAccess:
    """In a pod (and no kubeconfig named): the ServiceAccount; else the kubeconfig."""
    if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").is_file():
        return in_cluster()
    return from_kubeconfig(context, kubeconfig)


def job_path(namespace: str, name: str | None = None) -> str:
    ns = urllib.parse.quote(namespace, safe="")
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    return f"{base}/{urllib.parse.quote(name, safe='')}" if name else base


@contextlib.contextmanager
def job_lookup(namespace: str, name: str) -> Iterator[None]:
    """Turns the API's 404 for a FineTuneJob into an error that names the job and its namespace."""
    try:
        yield
    except AccessError as exc:
        if exc.status == 404:
            raise AccessError(f'FineTuneJob "{name}" not found in namespace "{namespace}"', 404) from None
        raise


def as_job(obj: Any, namespace: str, name: str) -> dict[str, Any]:
    """The decoded answer, which must be an object."""
    if not isinstance(obj, dict):
        raise AccessError(f"unexpected answer for FineTuneJob {namespace}/{name}")
    return obj


def get_job(access: ClusterAccess, namespace: str, name: str) -> dict[str, Any]:
    """The FineTuneJob object; a clear error when it does not exist."""
    with job_lookup(namespace, name):
        return as_job(access.get_json(job_path(namespace, name)), namespace, name)
