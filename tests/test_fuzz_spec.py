"""Property-based fuzzing of the whole FineTuneJob spec (hypothesis), with a fixed budget.

Starting from full specs (the contract example: every step, merge and serve; and the validation tests' base),
each example applies a few random mutations anywhere in the object -- replace a string with another one
(numbers in disguise, newlines, YAML syntax, unicode), replace any value with a hostile one (huge or negative
numbers, NaN, non-string keys, nested junk), delete a key, add an unknown key -- dumps it as YAML and runs the
CLI in-process. The properties:

* no traceback: ``ftctl validate`` and ``ftctl render`` return, never raise;
* exit codes are 0, 1 or 2 only, and the two commands agree on whether the file is valid;
* every accepted spec renders objects that real kubectl (``create --dry-run=client -o json`` against the
  emulator) reads back unchanged.

Derandomized with a bounded number of examples, so a CI run is reproducible and takes well under a minute on
two cores; ``FT_FUZZ_EXAMPLES`` raises the budget for a local hunt.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finetune_operator.cli import main
from finetune_operator.render import render
from finetune_operator.render.dump import to_yaml_documents
from finetune_operator.validation import load_documents, validate
from tests.emulator.fixtures import kubectl_binary
from tests.emulator.runner import EmulatorServer
from tests.test_validation import base
from tests.test_yaml_quoting import DISGUISED, _same

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FT_FUZZ_EXAMPLES", "200"))

pytestmark = pytest.mark.slow


def _seeds() -> list[dict[str, Any]]:
    contract = load_documents(ROOT / "manifests" / "examples" / "06-contract-sft-dpo-merge-serve.yaml")[0]
    full = base()
    full["spec"]["serve"] = {
        "enabled": True,
        "servedModelName": "bot",
        "args": ["--dtype", "float32"],
        "env": [{"name": "A", "value": "1"}],
    }
    full["spec"]["scheduling"] = {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "queueName": "team",
    }
    return [contract, full]


SEEDS = _seeds()

_STRINGS = st.one_of(
    st.sampled_from([*DISGUISED, "", " ", "a\nb", "x: y", "- a", "{}", "[", "&a", "*a", "!!python/object", "é", "a/b"]),
    st.text(max_size=12),
)
_SCALARS = st.one_of(
    _STRINGS,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(st.one_of(_STRINGS, st.integers(), st.booleans(), st.none()), _SCALARS, max_size=3),
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


#: Where user strings reach rendered objects more or less verbatim (env values, vLLM args, label values...).
_FREE = (
    ("spec", "serve", "env", int, "value"),
    ("spec", "serve", "args", int),
    ("spec", "serve", "servedModelName"),
    ("spec", "scheduling", "nodeSelector", str),
    ("spec", "scheduling", "tolerations", int, "value"),
    ("spec", "scheduling", "queueName"),
    ("spec", "datasets", int, "columns", str),
    ("spec", "datasets", int, "volume", "subPath"),
    ("spec", "runId"),
)


def _free(path: tuple[Any, ...]) -> bool:
    return any(
        len(p) == len(path)
        and all(isinstance(a, b) if isinstance(b, type) else a == b for a, b in zip(path, p, strict=True))
        for p in _FREE
    )


def _parent(obj: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        obj = obj[part]
    return obj


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    obj = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = [p for p in _paths(obj) if p]
        strings = [p for p in paths if isinstance(_parent(obj, p)[p[-1]], str)]
        if draw(st.booleans()):
            strings = [p for p in strings if _free(p)] or strings
        op = draw(st.sampled_from(["restring", "restring", "replace", "delete", "add"]))
        path = draw(st.sampled_from(strings if op == "restring" and strings else paths))
        parent = _parent(obj, path)
        if op == "restring":  # keeps the type: often still valid, so the render and kubectl properties are hit
            parent[path[-1]] = draw(_STRINGS)
        elif op == "replace":
            parent[path[-1]] = draw(_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.one_of(_STRINGS, st.integers()))] = draw(_VALUES)
        else:
            parent.append(draw(_VALUES))
    return obj


def _ftctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def kubectl_env() -> Iterator[dict[str, str]]:
    server = EmulatorServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="ft-fuzz-") as tmp:
            yield server.env(server.kubeconfig(Path(tmp) / "kubeconfig"))
    finally:
        server.stop()


def _kubectl_roundtrip(env: dict[str, str], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl_binary(), "create", "--dry-run=client", "--validate=false", "-o", "json", "-f", "-"],
        input=to_yaml_documents(objects),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    decoder, text, pos, out = json.JSONDecoder(), proc.stdout, 0, []
    while text[pos:].strip():
        obj, pos = decoder.raw_decode(text, pos + len(text[pos:]) - len(text[pos:].lstrip()))
        out.extend(obj["items"] if obj.get("kind") == "List" else [obj])
    return out


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(spec=mutated_specs())
def test_any_spec_is_refused_clearly_or_renders_what_kubectl_reads_back(
    spec: dict[str, Any], kubectl_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    rc_validate, _, err_validate = _ftctl("validate", "-f", str(path))
    rc_render, rendered, err_render = _ftctl("render", "-f", str(path))
    assert rc_validate in (0, 1, 2), err_validate
    assert rc_render in (0, 1, 2), err_render
    assert (rc_validate == 0) == (rc_render == 0), (err_validate, err_render)
    event(f"exit {rc_validate}")
    if rc_validate != 0:
        assert err_validate.strip() and err_render.strip()  # a reason is printed
        return
    objects = render(validate(load_documents(path)[0])).objects()
    assert [d for d in yaml.safe_load_all(rendered) if d] == objects
    back = _kubectl_roundtrip(kubectl_env, objects)
    assert len(back) == len(objects)
    for sent, got in zip(objects, back, strict=True):
        assert _same(sent, got) == [], f"{sent['kind']} {sent['metadata']['name']}: {_same(sent, got)}"


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)
@given(data=st.binary(max_size=400))
def test_any_bytes_are_refused_clearly(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("bytes") / "job.yaml"
    path.write_bytes(data)
    for command in ("validate", "render"):
        rc, _, err = _ftctl(command, "-f", str(path))
        assert rc in (0, 1, 2), err
        assert rc != 0 or command == "validate"  # random bytes are never a renderable job
