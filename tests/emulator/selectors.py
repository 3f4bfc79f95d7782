"""Label and field selectors, as the API server evaluates them on list and watch.

Plain kmock ignores ``labelSelector``/``fieldSelector`` and returns everything; an operator that watches its
children by label then sees foreign objects and a test cannot notice.  The grammar here is the one of
``k8s.io/apimachinery/pkg/labels``: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``
(exists) and ``!k`` (does not exist), comma-separated and AND-ed.

Field selectors: the real server supports only a few fields per resource and answers 400 for others; we support
``metadata.name`` and ``metadata.namespace`` everywhere plus the fields kubectl itself uses on core resources
(events' ``involvedObject.*``/``reason``/``type``, pods' ``spec.nodeName``/``status.phase``) with ``=``, ``==``
and ``!=``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import bad_request

Predicate = Callable[[Mapping[str, Any]], bool]

_SET_RE = re.compile(r'^\s*(!?)\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$')
_EQ_RE = re.compile(r'^\s*([A-Za-z0-9./_-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)\s*$')
_EXISTS_RE = re.compile(r'^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*$')

#: Fields a field selector may name, beyond metadata.name/namespace (as kube-apiserver registers them).
EXTRA_SELECTABLE_FIELDS: dict[str, set[str]] = {
    'events': {
        'involvedObject.kind', 'involvedObject.namespace', 'involvedObject.name', 'involvedObject.uid',
        'involvedObject.apiVersion', 'involvedObject.resourceVersion', 'involvedObject.fieldPath',
        'reason', 'reportingComponent', 'source', 'type', 'regarding.kind', 'regarding.name',
        'regarding.namespace', 'regarding.uid',
    },
    'pods': {'spec.nodeName', 'spec.restartPolicy', 'spec.schedulerName', 'spec.serviceAccountName',
             'status.phase', 'status.podIP', 'status.nominatedNodeName'},
    'secrets': {'type'},
    'namespaces': {'status.phase'},
}


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside ``( )`` of a set-based requirement."""
    terms: list[str] = []
    depth = 0
    current = ''
    for char in text:
        if char == '(':
            depth += 1
        elif char == ')':
            depth -= 1
        if char == ',' and depth == 0:
            terms.append(current)
            current = ''
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(text: str | None) -> Predicate:
    """Compile a label selector string into a predicate over an object (400 on bad syntax)."""
    if not text:
        return lambda obj: True
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(text):
        if m := _SET_RE.match(term):
            negated, key, op, values_text = m.groups()
            if negated:
                raise bad_request(f'unable to parse requirement: {term!r}')
            values = {v.strip() for v in values_text.split(',') if v.strip()}
            if op == 'in':
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := _EQ_RE.match(term):
            key, op, value = m.groups()
            if op == '!=':
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := _EXISTS_RE.match(term):
            negated, key = m.groups()
            if negated:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise bad_request(f'unable to parse requirement: found {term!r}, expected a label requirement')

    def predicate(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get('metadata') or {}).get('labels') or {}
        return all(check(labels) for check in checks)

    return predicate


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split('.'):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ''
    return str(value)


def parse_field_selector(text: str | None, plural: str) -> Predicate:
    """Compile a field selector; unknown fields answer 400 like the real server."""
    if not text:
        return lambda obj: True
    allowed = {'metadata.name', 'metadata.namespace'} | EXTRA_SELECTABLE_FIELDS.get(plural, set())
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_terms(text):
        m = _EQ_RE.match(term)
        if not m:
            raise bad_request(f'invalid field selector: {term!r}')
        field, op, value = m.groups()
        if field not in allowed:
            raise bad_request(f'field label not supported: {field}')
        if op == '!=':
            checks.append(lambda obj, f=field, v=value: _field_value(obj, f) != v)
        else:
            checks.append(lambda obj, f=field, v=value: _field_value(obj, f) == v)

    def predicate(obj: Mapping[str, Any]) -> bool:
        return all(check(obj) for check in checks)

    return predicate
