"""``--secrets-dir DIR``: Secrets for ``ftctl run --local``, laid out like projected Secret volumes.

``DIR/<secret name>/<key>`` holds the value of key ``<key>`` of Secret ``<secret name>`` (exactly what
``kubectl create secret ... --dry-run`` plus a Secret volume mount gives). The runner resolves the same
``secretKeyRef`` environment variables the renderer gives a pod, so a spec that finds its credentials here
finds them on the cluster too. Every reference is checked before the first step runs: a missing Secret must
not be discovered after hours of training. Values are never printed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from finetune_operator.errors import FieldError, SpecError


def secret_refs(env: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(variable, secret name, key) of every ``secretKeyRef`` variable in a pod's ``env`` list."""
    out = []
    for var in env:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            out.append((str(var["name"]), str(ref["name"]), str(ref["key"])))
    return out


def resolve(env: Iterable[Mapping[str, Any]], secrets_dir: Path | None, *, field: str) -> dict[str, str]:
    """The values of the ``secretKeyRef`` variables, read from ``secrets_dir``; one :class:`SpecError`
    naming every missing Secret key (with ``field``, the spec field that asked for them)."""
    refs = secret_refs(env)
    if not refs:
        return {}
    errors: list[FieldError] = []
    values: dict[str, str] = {}
    for var, name, key in refs:
        if secrets_dir is None:
            errors.append(
                FieldError(field, f"needs Secret {name!r} (key {key!r}): pass --secrets-dir DIR with DIR/{name}/{key}")
            )
            continue
        path = secrets_dir / name / key
        try:
            values[var] = path.read_text(encoding="utf-8").rstrip("\n")
        except OSError:
            errors.append(FieldError(field, f"Secret {name!r} has no key {key!r} ({path} is missing)"))
            continue
        if not values[var]:
            errors.append(FieldError(field, f"Secret {name!r} key {key!r} is empty ({path})"))
    if errors:
        raise SpecError(errors)
    return values
