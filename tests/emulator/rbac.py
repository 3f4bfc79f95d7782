"""Compare the emulator's request log with RBAC rules: which requests would a Role/ClusterRole forbid?

The emulator accepts any token and authorises everything, so RBAC mistakes (a forgotten ``patch`` on
``finetunejobs/status``, a ``watch`` on Events) would only surface on a real cluster.  Recording what the
operator actually requested (``FidelityEmulator.request_log``) and matching it against the chart's rules with
RBAC's own matching semantics catches them in CI: ``apiGroups``/``resources``/``verbs``/``resourceNames`` with
``*`` wildcards, ``resource/subresource`` names, and ``resourceNames`` never granting list/watch/create
without a name (as the Kubernetes authorizer behaves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .emulator import RequestRecord
from .errors import ApiError


def rule_allows(rule: Mapping[str, Any], record: RequestRecord) -> bool:
    """Whether one PolicyRule grants the request (RBAC's ``RuleAllows`` for resource requests)."""
    groups = rule.get("apiGroups") or []
    resources = rule.get("resources") or []
    verbs = rule.get("verbs") or []
    names = rule.get("resourceNames") or []
    if "*" not in verbs and record.verb not in verbs:
        return False
    if "*" not in groups and record.group not in groups:
        return False
    wanted = f"{record.resource}/{record.subresource}" if record.subresource else record.resource
    resource_ok = (
        "*" in resources
        or wanted in resources
        or (record.subresource is not None and f"*/{record.subresource}" in resources)
    )
    if not resource_ok:
        return False
    if names:
        return record.name is not None and record.name in names
    return True


def uncovered(records: Iterable[RequestRecord], rules: Iterable[Mapping[str, Any]]) -> list[RequestRecord]:
    """The distinct requests no rule grants (empty: the rules cover everything that was requested)."""
    rule_list = list(rules)
    missing: list[RequestRecord] = []
    for record in dict.fromkeys(records):  # distinct, in first-seen order
        if not any(rule_allows(rule, record) for rule in rule_list):
            missing.append(record)
    return missing


def unused(records: Iterable[RequestRecord], rules: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples granted by the rules but never requested (least-privilege review).

    Wildcards are reported as written; only explicit triples are checked.
    """
    seen = {(r.group, f"{r.resource}/{r.subresource}" if r.subresource else r.resource, r.verb) for r in records}
    result: list[tuple[str, str, str]] = []
    for rule in rules:
        if rule.get("resourceNames"):
            continue
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    if "*" in (group, resource, verb):
                        continue
                    if (group, resource, verb) not in seen:
                        result.append((group, resource, verb))
    return result


# ------------------------------------------------------------------------------------------------ enforcement


def _username(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


class Authorizer:
    """RBAC enforcement for chosen bearer tokens, as kube-apiserver's RBAC authorizer decides.

    ``install(objects)`` takes the Roles, ClusterRoles and bindings of an install (the chart rendered by Helm);
    ``bind_token(token, namespace, service_account)`` says whose token is whose. A request carrying a bound token
    is allowed only when a binding of that ServiceAccount grants it (ClusterRoleBinding: everywhere;
    RoleBinding: in its namespace, whether it refers to a Role or a ClusterRole); otherwise it is answered 403
    Forbidden with the API server's Status body and wording. Requests with any other token are the test's own
    (an admin): allowed. Discovery is not a resource request (every authenticated user may read it).
    """

    def __init__(self) -> None:
        self.objects: list[Mapping[str, Any]] = []
        self.tokens: dict[str, tuple[str, str]] = {}
        #: Every refused request: (username, record), for tests that assert what was refused.
        self.denied: list[tuple[str, RequestRecord]] = []

    def install(self, objects: Iterable[Mapping[str, Any]]) -> None:
        kinds = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
        self.objects.extend(o for o in objects if o.get("kind") in kinds)

    def bind_token(self, token: str, namespace: str, service_account: str) -> None:
        self.tokens[token] = (namespace, service_account)

    def _rules(self, namespace: str, name: str, request_namespace: str | None) -> Iterable[Mapping[str, Any]]:
        roles = {
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
            for o in self.objects
            if o["kind"] in ("Role", "ClusterRole")
        }
        for binding in self.objects:
            if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not any(
                s.get("kind") == "ServiceAccount" and s.get("name") == name and s.get("namespace") == namespace
                for s in binding.get("subjects") or []
            ):
                continue
            binding_ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            if binding_ns is not None and binding_ns != request_namespace:
                continue  # a RoleBinding grants nothing outside its namespace, nor on cluster-scoped objects
            ref = binding["roleRef"]
            role = roles.get((ref["kind"], binding_ns if ref["kind"] == "Role" else None, ref["name"]))
            yield from (role or {}).get("rules") or []

    def check(self, authorization: str | None, record: RequestRecord) -> ApiError | None:
        """None when allowed, else the 403 the API server would answer."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        subject = self.tokens.get(token)
        if subject is None:
            return None
        if any(rule_allows(rule, record) for rule in self._rules(*subject, record.namespace)):
            return None
        user = _username(*subject)
        self.denied.append((user, record))
        return forbidden(user, record)


def forbidden(user: str, record: RequestRecord) -> ApiError:
    """kube-apiserver's 403 for an RBAC denial (``k8s.io/apiserver/pkg/endpoints/handlers/responsewriters``)."""
    resource = f"{record.resource}/{record.subresource}" if record.subresource else record.resource
    qualified = f"{record.resource}.{record.group}" if record.group else record.resource
    what = f'{qualified} "{record.name}"' if record.name else qualified
    where = f'in the namespace "{record.namespace}"' if record.namespace else "at the cluster scope"
    message = (
        f'{what} is forbidden: User "{user}" cannot {record.verb} resource "{resource}" in API group '
        f'"{record.group}" {where}'
    )
    details: dict[str, Any] = {"group": record.group, "kind": record.resource}
    if record.name:
        details["name"] = record.name
    return ApiError(403, "Forbidden", message, details)
