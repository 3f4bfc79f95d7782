"""The emulator's RBAC enforcement decides as kube-apiserver's RBAC authorizer does (the subset the chart uses)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.emulator.emulator import RequestRecord
from tests.emulator.rbac import Authorizer

RULES = [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create"]}]


def _objects() -> list[dict[str, Any]]:
    sa = [{"kind": "ServiceAccount", "name": "op", "namespace": "sys"}]
    return [
        {
            "kind": "ClusterRole",
            "metadata": {"name": "cluster-reader"},
            "rules": [
                {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list"]}
            ],
        },
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "crb"},
            "subjects": sa,
            "roleRef": {"kind": "ClusterRole", "name": "cluster-reader"},
        },
        {"kind": "ClusterRole", "metadata": {"name": "jobs"}, "rules": RULES},
        # A ClusterRole bound by a RoleBinding grants only in the binding's namespace.
        {
            "kind": "RoleBinding",
            "metadata": {"name": "rb", "namespace": "ml"},
            "subjects": sa,
            "roleRef": {"kind": "ClusterRole", "name": "jobs"},
        },
        {
            "kind": "Role",
            "metadata": {"name": "status", "namespace": "lab"},
            "rules": [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"], "verbs": ["patch"]}],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "rb", "namespace": "lab"},
            "subjects": sa,
            "roleRef": {"kind": "Role", "name": "status"},
        },
    ]


def _rec(
    verb: str, group: str, resource: str, ns: str | None, name: str | None = None, sub: str | None = None
) -> RequestRecord:
    return RequestRecord(verb, group, "v1", resource, sub, ns, name)


@pytest.fixture()
def auth() -> Authorizer:
    a = Authorizer()
    a.install(_objects())
    a.bind_token("op-token", "sys", "op")
    return a


@pytest.mark.parametrize(
    ("record", "allowed"),
    [
        (_rec("get", "batch", "jobs", "ml", "x"), True),
        (_rec("delete", "batch", "jobs", "ml", "x"), False),  # verb not granted
        (_rec("get", "batch", "jobs", "other", "x"), False),  # RoleBinding: its namespace only
        (_rec("list", "batch", "jobs", None), False),  # nor cluster-wide
        (_rec("list", "apiextensions.k8s.io", "customresourcedefinitions", None), True),  # ClusterRoleBinding
        (_rec("patch", "finetune.dev", "finetunejobs", "lab", "j", sub="status"), True),
        (_rec("patch", "finetune.dev", "finetunejobs", "lab", "j"), False),  # the subresource is its own resource
    ],
)
def test_decisions(auth: Authorizer, record: RequestRecord, allowed: bool) -> None:
    assert (auth.check("Bearer op-token", record) is None) is allowed


def test_unbound_tokens_are_the_tests_own(auth: Authorizer) -> None:
    assert auth.check("Bearer admin", _rec("delete", "apps", "deployments", "ml", "x")) is None
    assert auth.check(None, _rec("delete", "apps", "deployments", "ml", "x")) is None


def test_forbidden_status_body(auth: Authorizer) -> None:
    err = auth.check("Bearer op-token", _rec("list", "batch", "jobs", None))
    assert err is not None and err.code == 403
    assert err.status()["reason"] == "Forbidden"
    assert err.message == (
        'jobs.batch is forbidden: User "system:serviceaccount:sys:op" cannot list resource "jobs" '
        'in API group "batch" at the cluster scope'
    )
    assert auth.denied == [("system:serviceaccount:sys:op", _rec("list", "batch", "jobs", None))]
