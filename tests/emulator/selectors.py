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

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*$")

#: Fields a field selector may name, beyond metadata.name/namespace (as kube-apiserver registers them).
EXTRA_SELECTABLE_FIELDS: dict[str, set[str]] = {
    "events": {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
        "regarding.kind",
        "regarding.name",
        "regarding.namespace",
        "regarding.uid",
    },
    "pods": {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "secrets": {"type"},
    "namespaces": {"status.phase"},
}


LabelCheck = Callable[[Mapping[str, str]], bool]
FieldCheck = Callable[[Mapping[str, Any]], bool]


def _label_in(key: str, values: set[str], negate: bool) -> LabelCheck:
    return lambda labels: (labels.get(key) in values) != negate


def _label_eq(key: str, value: str, negate: bool) -> LabelCheck:
    return lambda labels: (labels.get(key) == value) != negate


def _label_exists(key: str, negate: bool) -> LabelCheck:
    return lambda labels: (key in labels) != negate


def _field_eq(field: str, value: str, negate: bool) -> FieldCheck:
    return lambda obj: (_field_value(obj, field) == value) != negate


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside ``( )`` of a set-based requirement."""
    terms: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(text: str | None) -> Predicate:
    """Compile a label selector string into a predicate over an object (400 on bad syntax)."""
    if not text:
        return lambda obj: True
    checks: list[LabelCheck] = []
    for term in _split_terms(text):
        if m := _SET_RE.match(term):
            negated, key, op, values_text = m.groups()
            if negated:
                raise bad_request(f"unable to parse requirement: {term!r}")
            values = {v.strip() for v in values_text.split(",") if v.strip()}
            checks.append(_label_in(key, values, negate=op == "notin"))
        elif m := _EQ_RE.match(term):
            key, op, value = m.groups()
            checks.append(_label_eq(key, value, negate=op == "!="))
        elif m := _EXISTS_RE.match(term):
            negated, key = m.groups()
            checks.append(_label_exists(key, negate=bool(negated)))
        else:
            raise bad_request(f"unable to parse requirement: found {term!r}, expected a label requirement")

    def predicate(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    return str(value)


def parse_field_selector(text: str | None, plural: str) -> Predicate:
    """Compile a field selector; unknown fields answer 400 like the real server."""
    if not text:
        return lambda obj: True
    allowed = {"metadata.name", "metadata.namespace"} | EXTRA_SELECTABLE_FIELDS.get(plural, set())
    checks: list[FieldCheck] = []
    for term in _split_terms(text):
        m = _EQ_RE.match(term)
        if not m:
            raise bad_request(f"invalid field selector: {term!r}")
        field, op, value = m.groups()
        if field not in allowed:
            raise bad_request(f"field label not supported: {field}")
        checks.append(_field_eq(field, value, negate=op == "!="))

    def predicate(obj: Mapping[str, Any]) -> bool:
        return all(check(obj) for check in checks)

    return predicate
