"""Strings that look like numbers survive the trip through real kubectl unchanged.

PyYAML quotes what its YAML 1.1 reader would retype, but kubectl reads YAML with Go (sigs.k8s.io/yaml), which
also reads ``1e3``, ``0o17``, ``0x_1F``, ``1_000``, ``y`` and ``n`` as numbers or booleans: left plain, an env
value ``1e3`` reached the API server as a number and the object was refused. Every rendered object goes through
``kubectl create --dry-run=client -o json`` against the emulator and must come back with the same values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from finetune_operator.render import render
from finetune_operator.render.dump import retyped, to_yaml, to_yaml_documents
from finetune_operator.validation import validate
from tests.test_validation import base

#: Strings some YAML reader types as something else.
DISGUISED = [
    "1e3",
    "1e-5",
    "0o17",
    "0x_1F",
    "1_000",
    "0b101",
    "y",
    "N",
    "on",
    "Off",
    "~",
    ".5",
    "+1",
    ".inf",
    "07",
    "1:30",
    "2001-12-14",
    "null",
    "True",
]
PLAIN = ["abc", "v1", "1.2.3", "e3", "_1", "1e", "x1e3", "--port"]


@pytest.mark.parametrize("text", DISGUISED)
def test_disguised_strings_are_quoted(text: str) -> None:
    assert yaml.safe_load(to_yaml({"k": text})) == {"k": text}
    assert to_yaml({"k": text}).startswith("k: '")


@pytest.mark.parametrize("text", PLAIN)
def test_plain_strings_stay_plain(text: str) -> None:
    assert not retyped(text)
    assert to_yaml({"k": text}) == f"k: {text}\n"


def disguised_job() -> dict[str, Any]:
    """A valid job with number-like strings wherever a user string reaches a rendered object."""
    job = base()
    spec = job["spec"]
    spec["serve"] = {
        "enabled": True,
        "servedModelName": "1e3",
        "args": ["--max-num-seqs", "1e3", "--tokenizer-mode", "0o17", "--seed=1_000"],
        "env": [{"name": n, "value": v} for n, v in (("A", "1e3"), ("B", "0x_1F"), ("C", "y"), ("D", "1e-5"))],
    }
    spec["scheduling"] = {
        "nodeSelector": {"pool": "1e3", "gen": "0o17", "flag": "y"},
        "tolerations": [{"key": "gpu", "operator": "Equal", "value": "1e3", "effect": "NoSchedule"}],
        "queueName": "1e3",
        "priorityClassName": "1e3",
    }
    spec["runId"] = "1e3"
    return job


def _same(sent: Any, back: Any, path: str = "") -> list[str]:
    """Differences where ``back`` changed a value of ``sent`` (kubectl may add empty defaults: ignored)."""
    if isinstance(sent, dict):
        if not isinstance(back, dict):
            return [f"{path}: {type(back).__name__}"]
        return [d for k, v in sent.items() for d in _same(v, back.get(k), f"{path}.{k}")]
    if isinstance(sent, list):
        if not isinstance(back, list) or len(back) != len(sent):
            return [f"{path}: list changed"]
        return [d for i, (a, b) in enumerate(zip(sent, back, strict=True)) for d in _same(a, b, f"{path}[{i}]")]
    return [] if sent == back and type(sent) is type(back) else [f"{path}: {sent!r} -> {back!r}"]


def roundtrip(kubectl: Callable[..., Any], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every object as real kubectl reads the YAML the renderer writes."""
    proc = kubectl(
        "create", "--dry-run=client", "--validate=false", "-o", "json", "-f", "-", input=to_yaml_documents(objects)
    )
    decoder, text, pos, out = json.JSONDecoder(), proc.stdout, 0, []
    while text[pos:].strip():
        obj, end = decoder.raw_decode(text, pos + len(text[pos:]) - len(text[pos:].lstrip()))
        out.extend(obj["items"] if obj.get("kind") == "List" else [obj])
        pos = end
    return out


def test_rendered_objects_roundtrip_through_kubectl(kubectl: Callable[..., Any]) -> None:
    plan = render(validate(disguised_job()))
    objects = plan.objects()
    back = roundtrip(kubectl, objects)
    assert len(back) == len(objects)
    for sent, got in zip(objects, back, strict=True):
        assert _same(sent, got) == [], f"{sent['kind']} {sent['metadata']['name']}"
    dep = next(o for o in back if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["A"] == "1e3" and env["B"] == "0x_1F" and env["C"] == "y"
