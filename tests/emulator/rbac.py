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


def rule_allows(rule: Mapping[str, Any], record: RequestRecord) -> bool:
    """Whether one PolicyRule grants the request (RBAC's ``RuleAllows`` for resource requests)."""
    groups = rule.get('apiGroups') or []
    resources = rule.get('resources') or []
    verbs = rule.get('verbs') or []
    names = rule.get('resourceNames') or []
    if '*' not in verbs and record.verb not in verbs:
        return False
    if '*' not in groups and record.group not in groups:
        return False
    wanted = f'{record.resource}/{record.subresource}' if record.subresource else record.resource
    resource_ok = (
        '*' in resources or wanted in resources
        or (record.subresource is not None and f'*/{record.subresource}' in resources)
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
    seen = {(r.group, f'{r.resource}/{r.subresource}' if r.subresource else r.resource, r.verb) for r in records}
    result: list[tuple[str, str, str]] = []
    for rule in rules:
        if rule.get('resourceNames'):
            continue
        for group in rule.get('apiGroups') or []:
            for resource in rule.get('resources') or []:
                for verb in rule.get('verbs') or []:
                    if '*' in (group, resource, verb):
                        continue
                    if (group, resource, verb) not in seen:
                        result.append((group, resource, verb))
    return result
