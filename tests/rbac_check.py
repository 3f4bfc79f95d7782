"""Evaluate API requests against RBAC objects the way the Kubernetes RBAC authorizer does.

Used by tests/test_rbac.py to prove the chart's rules both sufficient (every request the operator made is
allowed) and minimal (every permission granted was used). Kept free of pytest so it can be unit-tested.

Semantics implemented (the subset our chart uses; anything else is rejected rather than guessed):
- a rule matches when apiGroups, resources (``plural`` or ``plural/subresource``) and verbs contain the
  request's values (``*`` is refused: the chart must not use wildcards), and, when the rule has
  ``resourceNames``, the request names one of them;
- a ClusterRole bound by a ClusterRoleBinding applies everywhere, cluster-scoped requests included; a Role (or
  a ClusterRole bound by a RoleBinding) applies only to namespaced requests in the binding's namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tests.emulator.emulator import RequestRecord

#: An API request as RBAC sees it: the emulator's request-log record (one definition for both).
Request = RequestRecord


class Permission(NamedTuple):
    """One atom of a rule: a verb on a (group, resource[/subresource])."""

    group: str
    resource: str
    verb: str


@dataclass(frozen=True)
class Grant:
    """Rules in force for a subject, and where: ``namespace`` None means cluster-wide.

    ``source`` names the role; the same Role bound in several namespaces shares one source, so that its
    permissions count as used when any namespace used them (the chart renders the Roles from one template).
    """

    source: str
    namespace: str | None
    rules: tuple[Mapping[str, Any], ...]


def _resource(req: Request) -> str:
    return f"{req.resource}/{req.subresource}" if req.subresource else req.resource


def permissions(rule: Mapping[str, Any]) -> list[Permission]:
    """The atoms of a rule; wildcards and non-resource URLs are refused."""
    if "nonResourceURLs" in rule:
        raise ValueError(f"nonResourceURLs are not expected: {rule}")
    groups, resources, verbs = rule.get("apiGroups", []), rule.get("resources", []), rule.get("verbs", [])
    for values in (groups, resources, verbs):
        if "*" in values:
            raise ValueError(f"wildcard in rule {rule}")
    return [Permission(g, r, v) for g in groups for r in resources for v in verbs]


def rule_allows(rule: Mapping[str, Any], req: Request) -> bool:
    if Permission(req.group, _resource(req), req.verb) not in permissions(rule):
        return False
    names = rule.get("resourceNames")
    return not names or (req.name is not None and req.name in names)


def grant_allows(grant: Grant, req: Request) -> Mapping[str, Any] | None:
    """The first rule of ``grant`` that allows ``req`` (None if none does)."""
    if grant.namespace is not None and req.namespace != grant.namespace:
        return None
    return next((rule for rule in grant.rules if rule_allows(rule, req)), None)


def grants_for(objects: Iterable[Mapping[str, Any]], service_account: str, namespace: str) -> list[Grant]:
    """Every grant the bindings among ``objects`` give to ServiceAccount ``namespace/service_account``."""
    objects = list(objects)
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    grants = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account and s.get("namespace") == namespace
            for s in subjects
        ):
            continue
        ref = binding["roleRef"]
        binding_ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role_ns = binding_ns if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        if role is None:
            raise ValueError(f"{binding['kind']} {binding['metadata']['name']} refers to a missing {ref}")
        grants.append(Grant(f"{ref['kind']}/{ref['name']}", binding_ns, tuple(role.get("rules") or ())))
    return grants


@dataclass
class Verdict:
    """Requests no grant allows, and granted permissions no request used (by grant source)."""

    denied: list[Request]
    unused: dict[str, list[Permission]]


def evaluate(grants: Sequence[Grant], requests: Iterable[Request]) -> Verdict:
    used: dict[str, set[Permission]] = {g.source: set() for g in grants}
    denied = []
    for req in requests:
        allowed = False
        for grant in grants:
            rule = grant_allows(grant, req)
            if rule is not None:
                allowed = True
                used[grant.source].add(Permission(req.group, _resource(req), req.verb))
        if not allowed:
            denied.append(req)
    unused: dict[str, list[Permission]] = {}
    for grant in grants:
        granted = {p for rule in grant.rules for p in permissions(rule)}
        left = sorted(granted - used[grant.source])
        if left:
            unused[grant.source] = left
    return Verdict(sorted(set(denied), key=str), unused)
