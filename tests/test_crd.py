"""The generated CRD: committed copy in sync, structural schema, examples accepted, CEL rules evaluated.

CEL rules are compiled and evaluated with cel-python (a pure-Python CEL implementation), on good objects and on
bad ones, including the transition rules that make parts of the spec immutable. The same bad objects are also
checked against :mod:`finetune_operator.validation`, so the API server and ``ftctl validate`` agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from finetune_operator import backends
from finetune_operator import crd as crd_module
from finetune_operator.crd import CEL_RULES, build_crd
from finetune_operator.validation import check, load_documents
from tests.test_validation import KTO_DATA, base, both, drop, put

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return build_crd()


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    version = crd["spec"]["versions"][0]
    return dict(version["schema"]["openAPIV3Schema"])


def test_committed_crd_matches_the_types() -> None:
    from finetune_operator.cli.crd import render_yaml

    assert COMMITTED.read_text(encoding="utf-8") == render_yaml(), "stale CRD: run `ftctl crd > crds/...yaml`"


def test_crd_is_deterministic() -> None:
    from finetune_operator.cli.crd import render_yaml

    assert render_yaml() == render_yaml()


def test_crd_names_and_columns(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["group"] == "finetune.dev" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "FineTuneJob",
        "finetunejobs",
        ["ftj"],
        ["finetune"],
    )
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Stage": ".status.currentStage",
        "State": ".status.state",
        "Progress": ".status.progress",
        "Loss": ".status.loss",
        "Metric": ".status.metric",
        "Age": ".metadata.creationTimestamp",
    }


def test_crd_is_a_valid_kubernetes_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.33", strict=True)


# --- structural schema ------------------------------------------------------------------------------------


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema):
        assert "$ref" not in node and "$defs" not in node, path
        for junctor in ("anyOf", "oneOf", "allOf", "not"):
            assert junctor not in node, f"{path}: {junctor}"
        typed = (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties", {}) is not False, path
        assert "title" not in node and "default" not in node, path
        if "exclusiveMaximum" in node:
            assert node["exclusiveMaximum"] is True and "maximum" in node, path


def test_preserve_unknown_fields_only_on_args(schema: dict[str, Any]) -> None:
    preserved = [p for p, n in _walk(schema) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert sorted(preserved) == ["spec.evaluate.args", "spec.stages[].args"]


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema):
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description", "").strip(), f"{path}.{name} has no description"


def test_spec_strings_and_lists_are_bounded(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, f"{path} has no maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} has no maxItems"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path} map has no maxProperties"


def test_enums_and_bounds_from_the_types(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    stage = spec["stages"]["items"]["properties"]
    assert spec["backend"]["enum"] == list(backends.REGISTRY)  # the registry is the one list of backends
    assert stage["type"]["enum"] == ["pt", "sft", "rm", "ppo", "dpo", "kto"]
    assert stage["method"]["enum"] == ["full", "freeze", "lora", "qlora"]
    assert stage["deepspeed"]["properties"]["zeroStage"] == {
        "description": "ZeRO stage 0-3.",
        "maximum": 3,
        "minimum": 0,
        "type": "integer",
    }
    assert spec["retries"]["minimum"] == 0
    assert stage["resources"]["properties"]["nodes"]["minimum"] == 1
    assert schema["properties"]["metadata"]["properties"]["name"]["maxLength"] == 63


def test_status_schema_has_no_free_form_maps(schema: dict[str, Any]) -> None:
    reported = schema["properties"]["status"]["properties"]["reported"]
    assert set(reported["additionalProperties"]["properties"]) >= {"step", "totalSteps", "loss", "percent"}


# --- objects against the schema ----------------------------------------------------------------------------


def _schema_errors(schema: dict[str, Any], obj: Any) -> list[str]:
    # OpenAPI v3.0 (boolean exclusiveMaximum) is closest to draft 4; x-kubernetes-* keywords are ignored here
    # (CEL is evaluated separately below) and additionalProperties is not pruning but rejecting: stricter.
    strict = _closed(copy.deepcopy(schema))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft4Validator(strict).iter_errors(obj)
    ]


def _closed(node: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown fields where the API server would prune them (so typos in examples are caught)."""
    for _, sub in _walk(node):
        if sub.get("type") == "object" and "properties" in sub and not sub.get("x-kubernetes-preserve-unknown-fields"):
            sub["additionalProperties"] = False
    node["properties"]["metadata"].pop("additionalProperties", None)
    return node


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_match_the_crd_schema(schema: dict[str, Any], path: Path) -> None:
    for doc in load_documents(path):
        assert _schema_errors(schema, doc) == []
        assert _cel_failures(doc) == []


def test_base_spec_matches_the_crd_schema(schema: dict[str, Any]) -> None:
    assert _schema_errors(schema, base()) == []


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (put("spec.stages[0].type", "grpo"), "spec.stages.0.type"),
        (put("spec.stages[0].deepspeed", {"zeroStage": 5}), "spec.stages.0.deepspeed.zeroStage"),
        (put("spec.retries", -1), "spec.retries"),
        (put("spec.stages[0].resources.memory", "16GB"), "spec.stages.0.resources.memory"),
        (put("metadata.name", "x" * 64), "metadata.name"),
        (put("spec.stages[0].lora.dropout", 1.0), "spec.stages.0.lora.dropout"),
        (put("spec.stages[0].lora.target", "q proj"), "spec.stages.0.lora.target"),
        (put("spec.modle", {}), "spec"),
    ],
    ids=["stage-type", "zero-stage", "retries", "quantity", "name-length", "dropout", "lora-target", "unknown"],
)
def test_schema_rejects(schema: dict[str, Any], mutate: Callable[[dict[str, Any]], None], where: str) -> None:
    obj = base()
    mutate(obj)
    errors = _schema_errors(schema, obj)
    assert any(e.startswith(f"{where}:") for e in errors), errors
    assert check(obj)[1], "ftctl validate must reject what the API server rejects"


# --- CEL ----------------------------------------------------------------------------------------------------

_ENV = celpy.Environment()


def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


def _nodes(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every value at a schema path (``spec.stages[]``) with a concrete location."""
    found: list[tuple[str, Any]] = [("", obj)]
    for part in path.split(".") if path else ():
        name = part.rstrip("[]")
        nxt: list[tuple[str, Any]] = []
        for loc, value in found:
            if isinstance(value, dict) and name in value:
                nxt.append((f"{loc}.{name}".lstrip("."), value[name]))
        if part.endswith("[]"):
            nxt = [
                (f"{loc}[{i}]", item) for loc, value in nxt if isinstance(value, list) for i, item in enumerate(value)
            ]
        found = nxt
    return iter(found)


def _lookup(obj: Any, loc: str) -> Any:
    import re

    cur = obj
    for key, idx in re.findall(r"([^.\[\]]+)|\[(\d+)\]", loc):
        try:
            cur = cur[int(idx)] if idx else cur[key]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _cel_view(schema: dict[str, Any], value: Any) -> Any:
    """What the API server exposes to CEL: declared fields only. Unknown fields of a preserve-unknown-fields
    object (``args``) are invisible to rules, so a rule that relied on them would fail these tests."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if isinstance(schema.get("additionalProperties"), dict):
            return {k: _cel_view(schema["additionalProperties"], v) for k, v in value.items()}
        props = schema.get("properties", {})
        return {k: _cel_view(props[k], v) for k, v in value.items() if k in props}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_cel_view(schema["items"], v) for v in value]
    return value


def _cel_failures(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Messages of the CEL rules that ``obj`` breaks (transition rules only when ``old`` is given)."""
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = _cel_view(schema, obj)
    old = _cel_view(schema, old) if old is not None else None
    failures: list[str] = []
    for path, rules in CEL_RULES.items():
        for loc, value in _nodes(obj, path):
            for rule, message, _ in rules:
                activation = {"self": celpy.json_to_cel(value)}
                if "oldSelf" in rule:
                    old_value = _lookup(old, loc) if old is not None else None
                    if old_value is None:
                        continue  # the API server runs transition rules on updates of existing values only
                    activation["oldSelf"] = celpy.json_to_cel(old_value)
                if not bool(_program(rule).evaluate(activation)):
                    failures.append(message)
    return failures


def test_every_cel_rule_compiles_and_is_in_the_crd(schema: dict[str, Any]) -> None:
    in_crd = [v["rule"] for _, n in _walk(schema) for v in n.get("x-kubernetes-validations", [])]
    declared = [rule for rules in CEL_RULES.values() for rule, _, _ in rules]
    assert sorted(in_crd) == sorted(declared)
    for rule in declared:
        _program(rule)
    for _, node in _walk(schema):
        for v in node.get("x-kubernetes-validations", []):
            assert v["message"]


CEL_BAD: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("lora-on-full", put("spec.stages[0].method", "full"), "lora settings apply"),
    ("duplicate-dataset", put("spec.datasets[1].name", "chat"), "dataset names must be unique"),
    ("duplicate-stage", put("spec.stages[1].name", "sft"), "stage names must be unique"),
    ("undeclared-dataset", put("spec.stages[0].datasets", ["nope"]), "must be declared"),
    ("dpo-on-plain", put("spec.stages[1].datasets", ["chat"]), "rm and dpo stages need ranking"),
    ("sft-on-ranking", put("spec.stages[0].datasets", ["prefs"]), "cannot train on ranking"),
    ("kto-on-ranking", put("spec.stages[1].type", "kto"), "cannot train on ranking"),
    (
        "kto-without-tag",
        both(
            put("spec.datasets[2]", KTO_DATA), put("spec.stages[1].type", "kto"), put("spec.stages[1].datasets", ["fb"])
        ),
        "ktoTag",
    ),
    ("ranking-without-rejected", drop("spec.datasets[1].columns.rejected"), "columns.chosen and columns.rejected"),
    ("reserved-stage-name", put("spec.stages[1].name", "serve"), "reserved"),
    ("run-id-is-stage-name", put("spec.runId", "dpo"), "runId must not be a stage or step name"),
    ("run-id-is-merged", put("spec.runId", "merged"), "runId must not be a stage or step name"),
    ("tp-over-gpus", put("spec.serve", {"enabled": True, "tensorParallelSize": 2}), "tensorParallelSize"),
    (
        "tp-over-gpus-explicit",
        put("spec.serve", {"tensorParallelSize": 8, "resources": {"gpusPerNode": 4}}),
        "tensorParallelSize",
    ),
    (
        "toleration",
        put("spec.scheduling", {"tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}),
        "operator is Exists",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), [pytest.param(m, w, id=i) for i, m, w in CEL_BAD])
def test_cel_rejects(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    obj = base()
    assert _cel_failures(obj) == []
    mutate(obj)
    failures = _cel_failures(obj)
    assert any(message in f for f in failures), failures
    assert check(obj)[1], "ftctl validate must reject what the CEL rules reject"


@pytest.mark.parametrize(
    "mutate",
    [
        put("spec.serve", {"tensorParallelSize": 4, "resources": {"gpusPerNode": 0}}),
        put("spec.serve", {"tensorParallelSize": 4, "resources": {"gpusPerNode": 4}}),
        both(put("spec.stages[0].method", "qlora")),
        both(
            put("spec.datasets[2]", {**KTO_DATA, "columns": {"ktoTag": "label"}}),
            put("spec.stages[1].type", "kto"),
            put("spec.stages[1].datasets", ["fb"]),
        ),
        drop("spec.stages[0].lora"),
    ],
    ids=["cpu-serve", "tp-equal", "qlora", "kto", "no-lora-block"],
)
def test_cel_accepts(mutate: Callable[[dict[str, Any]], None]) -> None:
    obj = base()
    mutate(obj)
    assert _cel_failures(obj) == []


IMMUTABLE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("model", put("spec.model.template", "llama3"), "spec.model is immutable"),
    ("datasets", put("spec.datasets[0].volume.subPath", "other.jsonl"), "spec.datasets is immutable"),
    ("stages", put("spec.stages[0].method", "qlora"), "spec.stages is immutable"),
    (
        "stage-added",
        put("spec.stages[2]", {"name": "x", "type": "sft", "datasets": ["chat"]}),
        "spec.stages is immutable",
    ),
    ("output", put("spec.output.volume.subPath", "x"), "spec.output is immutable"),
    ("backend-added", put("spec.backend", "pytorchjob"), "spec.backend is immutable"),
]

#: Status of a job whose first workload was created (what the operator writes).
STARTED = {"state": "Running", "stages": [{"name": "sft", "type": "sft", "state": "Running", "attempts": 1}]}
NOT_STARTED = {"state": "Failed", "stages": [{"name": "sft", "type": "sft", "state": "Pending", "attempts": 0}]}


@pytest.mark.parametrize(("mutate", "message"), [pytest.param(m, w, id=i) for i, m, w in IMMUTABLE])
def test_immutable_once_started(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    old = {**base(), "status": STARTED}
    new = copy.deepcopy(old)
    mutate(new)
    assert any(f.startswith(message) for f in _cel_failures(new, old))


@pytest.mark.parametrize(
    "status", [None, {}, {"state": "Failed"}, NOT_STARTED], ids=["none", "empty", "no-stages", "zero-attempts"]
)
@pytest.mark.parametrize(("mutate", "message"), [pytest.param(m, w, id=i) for i, m, w in IMMUTABLE])
def test_spec_can_be_fixed_before_start(
    status: dict[str, Any] | None, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    old = base() if status is None else {**base(), "status": status}
    new = copy.deepcopy(old)
    mutate(new)
    assert _cel_failures(new, old) == []


@pytest.mark.parametrize(
    "mutate",
    [
        put("spec.suspend", True),
        put("spec.retries", 5),
        put("spec.serve", {"enabled": True, "replicas": 3}),
        put("spec.merge.enabled", False),
        put("spec.image", "registry.example.com/worker:0.2.0"),
        put("status.state", "Succeeded"),
    ],
    ids=["suspend", "retries", "serve-replicas", "merge", "image", "status"],
)
def test_mutable_fields(mutate: Callable[[dict[str, Any]], None]) -> None:
    old = {**base(), "status": STARTED}
    new = copy.deepcopy(old)
    mutate(new)
    assert _cel_failures(new, old) == []


def test_args_are_opaque_to_cel() -> None:
    """The API server hides preserve-unknown fields from CEL: no rule may depend on ``args``."""
    for rules in CEL_RULES.values():
        for rule, _, _ in rules:
            assert "args" not in rule, rule


def test_module_documents_its_decisions() -> None:
    doc = crd_module.__doc__ or ""
    assert "lora.target" in doc and "preserve-unknown-fields" in doc


def test_committed_crd_is_yaml_of_build_crd() -> None:
    assert yaml.safe_load(COMMITTED.read_text(encoding="utf-8")) == build_crd()


def test_committed_crd_passes_yamllint() -> None:
    from yamllint import config, linter

    conf = config.YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    problems = [str(p) for p in linter.run(COMMITTED.read_text(encoding="utf-8"), conf)]
    assert problems == []


# A new spec.runId re-runs the pipeline: with it the training fields may change; without it they may not.
RERUN: list[tuple[str, Callable[[dict[str, Any]], None]]] = [(i, m) for i, m, _ in IMMUTABLE] + [
    ("several", both(put("spec.stages[0].args", {"learning_rate": 1e-5}), put("spec.model.template", "llama3")))
]


@pytest.mark.parametrize("old_run", [None, "r1"], ids=["first-run-id", "new-run-id"])
@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m in RERUN])
def test_training_fields_change_with_a_new_run_id(
    old_run: str | None, mutate: Callable[[dict[str, Any]], None]
) -> None:
    old = {**base(), "status": STARTED}
    if old_run is not None:
        old["spec"]["runId"] = old_run
    new = copy.deepcopy(old)
    mutate(new)
    assert _cel_failures(new, old), "without a runId change the edit is refused"
    new["spec"]["runId"] = "r2"
    assert _cel_failures(new, old) == []
    assert not check(new)[1]


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m in RERUN])
def test_same_run_id_keeps_training_fields_immutable(mutate: Callable[[dict[str, Any]], None]) -> None:
    old = {**base(), "status": STARTED}
    old["spec"]["runId"] = "r1"
    new = copy.deepcopy(old)
    mutate(new)
    assert any("is immutable once the pipeline has started" in f for f in _cel_failures(new, old))


def test_run_id_cannot_be_removed_once_started() -> None:
    old = {**base(), "status": STARTED}
    old["spec"]["runId"] = "r1"
    new = copy.deepcopy(old)
    del new["spec"]["runId"]
    assert any(f.startswith("spec.runId cannot be removed") for f in _cel_failures(new, old))
    assert _cel_failures(new, {**old, "status": NOT_STARTED}) == []  # before the start anything goes
    new["spec"]["runId"] = "r2"
    assert _cel_failures(new, old) == []


@pytest.mark.parametrize(
    ("value", "ok"),
    [("r2", True), ("2026-06-01", True), ("a" * 20, True), ("a" * 21, False), ("Run2", False), ("-r", False)],
)
def test_run_id_format_in_the_crd_schema(schema: dict[str, Any], value: str, ok: bool) -> None:
    obj = base()
    obj["spec"]["runId"] = value
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(obj))
    assert (not errors) == ok, errors
    assert (not check(obj)[1]) == ok
