"""Patch formats the API server accepts, applied to plain JSON objects.

Plain kmock merges every PATCH body into the object as a dict-merge, whatever its content type: a JSON-patch
(a list of operations) then fails or corrupts the object, and ``null`` never deletes a key.  Here:

* ``application/merge-patch+json`` — RFC 7386: dicts merge recursively, ``null`` deletes, lists are replaced.
* ``application/strategic-merge-patch+json`` — treated as a merge patch (documented gap: list elements are not
  merged by their patch-merge key; ``$patch: delete``/``$patch: replace`` on maps are honoured; other
  ``$``-directives such as ``$setElementOrder/...`` that kubectl adds are dropped so they never reach the
  stored object).  Our operator and kopf never rely on list merging.
* ``application/json-patch+json`` — RFC 6902 with all six ops; a failed ``test`` or a missing path answers 422
  exactly like kube-apiserver, which is what kopf's optimistic concurrency relies on.
* ``application/apply-patch+yaml`` (server-side apply) — merged like a merge patch; no field managers, no
  ownership conflicts (documented gap).
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import bad_request, unprocessable

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE, STRATEGIC, JSON_PATCH, APPLY, "application/apply-patch+json", "application/apply-patch+cbor")


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """Apply an RFC 7386 merge patch (returns a new value; ``target`` is not modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if strategic and patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue  # $setElementOrder/..., $retainKeys, $deleteFromPrimitiveList/...: not emulated
        if value is None or (strategic and isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic)
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise unprocessable(f"invalid JSON pointer {pointer!r}")
    return [_unescape(token) for token in pointer[1:].split("/")]


def _parent(doc: Any, tokens: list[str], pointer: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise unprocessable(f'doc is missing path: "{pointer}": missing value')
    return node


def _get(doc: Any, pointer: str) -> Any:
    tokens = _split(pointer)
    if not tokens:
        return doc
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise unprocessable(f'doc is missing path: "{pointer}": missing value')


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _split(pointer)
    if not tokens:
        return value
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise unprocessable(f'add operation does not apply: index {last!r} out of bounds for "{pointer}"')
    else:
        raise unprocessable(f'doc is missing path: "{pointer}"')
    return doc


def _remove(doc: Any, pointer: str) -> Any:
    tokens = _split(pointer)
    if not tokens:
        raise unprocessable("cannot remove the document root")
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise unprocessable(f"Unable to remove nonexistent key: {last}: missing value")
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch (returns a new document; 422 on any failed operation)."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid json patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "test":
            if _get(doc, path) != op.get("value"):
                raise unprocessable(f"testing value {path} failed: test failed")
        elif kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)  # must exist
            if _split(path):
                doc = _remove(doc, path)
                doc = _add(doc, path, copy.deepcopy(op.get("value")))
            else:
                doc = copy.deepcopy(op.get("value"))
        elif kind == "move":
            value = _get(doc, op["from"])
            doc = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        else:
            raise bad_request(f"unexpected json patch operation {kind!r}")
    return doc


def apply_patch(content_type: str, target: Any, patch: Any) -> Any:
    """Dispatch on the PATCH request's content type (415 for unknown ones, like the real server)."""
    base = content_type.split(";")[0].strip().lower()
    if base == JSON_PATCH:
        return json_patch(target, patch)
    if base == MERGE or base.startswith("application/apply-patch"):
        return merge_patch(target, patch)
    if base == STRATEGIC:
        return merge_patch(target, patch, strategic=True)
    from .errors import unsupported_media_type

    raise unsupported_media_type(content_type)
