"""Every API permission the operator uses, as data: the Helm chart's ClusterRole is built from it and a test
checks that the operator, run through whole pipelines against the emulator, sends no request outside it.

Least privilege: no wildcards, no Secrets (tokens reach pods only as ``secretKeyRef``), no pods.
"""

from __future__ import annotations

from typing import Any, Final

from finetune_operator import backends
from finetune_operator.api import constants as c

#: (apiGroup, resources, verbs)
RULES: Final[tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = (
    (c.GROUP, (c.PLURAL,), ("get", "list", "watch", "patch")),
    (c.GROUP, (f"{c.PLURAL}/status",), ("get", "patch")),
    ("batch", ("jobs",), ("get", "list", "watch", "create", "patch", "delete")),
    *(
        (r.api_groups[0], r.resources, r.verbs)
        for b in backends.REGISTRY.values()
        for r in b.rules()
        if r.resources != ("jobs",)
    ),
    ("apps", ("deployments",), ("get", "list", "watch", "create", "patch", "delete")),
    ("", ("configmaps", "services"), ("get", "create")),
    ("", ("events",), ("create",)),
    # kopf: namespace discovery (``--namespace`` patterns) and CRDs installed after the operator started.
    ("", ("namespaces",), ("list", "watch")),
    ("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch")),
)


def allows(group: str, resource: str, verb: str) -> bool:
    """Whether ``RULES`` grant ``verb`` on ``group``/``resource`` (``resource`` may be ``plural/subresource``)."""
    return any(group == g and resource in rs and verb in vs for g, rs, vs in RULES)


def cluster_role(name: str = "finetune-operator") -> dict[str, Any]:
    """A ClusterRole with exactly ``RULES``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": [g], "resources": list(rs), "verbs": list(vs)} for g, rs, vs in RULES],
    }
