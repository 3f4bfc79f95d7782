"""The FineTuneJob CustomResourceDefinition, generated from the pydantic API types.

Why generated: the CRD's schema is what the API server enforces and what ``kubectl explain ftj.spec.stages``
prints. Writing it by hand would let it drift from :mod:`finetune_operator.api.types`, which the renderer
and the operator read. ``ftctl crd`` prints it, ``crds/finetune.dev_finetunejobs.yaml`` is the committed copy,
and ``tests/test_crd.py`` fails when the two differ.

Pydantic emits JSON Schema (``$ref``, ``anyOf`` with ``null``, ``title``, draft-2020 ``exclusiveMaximum``).
Kubernetes needs a *structural* OpenAPI v3 schema: every node typed, no ``$ref``, no type unions. The
conversion here inlines ``$ref``, drops ``null`` from unions (an omitted field is how Kubernetes says "unset"),
drops ``title``/``default`` (defaults stay in the types and the renderer: server-side defaulting would write
them into every stored object and make GitOps diffs noisy), and keeps descriptions, bounds, patterns and enums.

Decisions:

- ``x-kubernetes-preserve-unknown-fields`` is set only on ``spec.stages[].args`` (free-form LLaMA-Factory
  arguments, checked by :mod:`finetune_operator.validation` against LLaMA-Factory's real definitions).
- ``spec.stages[].lora.target`` is ``str | list[str]`` in the types, but a structural schema cannot hold a
  string-or-list field without preserving unknown fields. The CRD types it as a **string** (``all`` or a
  comma-separated list of module names, checked by a pattern); the YAML list form is an ``ftctl``
  convenience (render / run --local) that the renderer joins with commas.
- ``status`` is a subresource with a full schema; unknown status fields are pruned.
- Cross-field rules that CEL can express are ``x-kubernetes-validations`` so a bad object is refused by the
  API server even before the operator sees it. CEL cannot see inside ``args`` (the API server does not expose
  unknown fields of preserve-unknown-fields objects to CEL), so reserved and misspelled arguments are left to
  :mod:`finetune_operator.validation` (``ftctl validate`` and the operator's ``InvalidSpec`` condition).
- The immutable parts of the spec (model, datasets, stages, output, backend) are guarded by transition rules
  once the pipeline has started (the old status shows a created workload); before that a spec refused by the
  operator (``InvalidSpec``) can still be fixed in place. ``suspend``, ``serve.replicas`` and ``retries`` stay
  mutable. CEL may not see an edit confined to ``stages[].args`` (see above); the operator compares the whole
  spec it accepted, so such an edit is refused there (``ImmutableField``).
"""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api import naming, patterns
from finetune_operator.api.patterns import DNS_LABEL_PATTERN
from finetune_operator.api.types import PREFERENCE_STAGES, FineTuneJob
from finetune_operator.render.serve import LOADER_ENV, OWNED_ENV

__all__ = ["CEL_RULES", "CRD_NAME", "build_crd", "open_api_schema"]

CRD_NAME = f"{c.PLURAL}.{c.GROUP}"

_DROP_KEYS = frozenset({"title", "default", "examples"})
_LORA_TARGET_PATTERN = patterns.LORA_TARGET_PATTERN
_QUANTITY_PATTERN = patterns.QUANTITY_PATTERN

#: Bounds the API server needs (CEL cost estimation, request size) on nodes that the types leave open.
#: Keyed by schema path (``.`` between properties, ``[]`` for array items, ``{}`` for map values).
_EXTRA: dict[str, dict[str, Any]] = {
    "spec.stages[].datasets[]": {"maxLength": 63},
    "spec.stages[].args": {"maxProperties": 256},
    "spec.stages[].resources.cpu": {"pattern": _QUANTITY_PATTERN},
    "spec.stages[].resources.memory": {"pattern": _QUANTITY_PATTERN},
    "spec.merge.resources.cpu": {"pattern": _QUANTITY_PATTERN},
    "spec.merge.resources.memory": {"pattern": _QUANTITY_PATTERN},
    "spec.serve.resources.cpu": {"pattern": _QUANTITY_PATTERN},
    "spec.serve.resources.memory": {"pattern": _QUANTITY_PATTERN},
    "spec.serve.args[]": {"maxLength": 4096},
    "spec.scheduling.nodeSelector": {"maxProperties": 64},
    "spec.evaluate.datasets[]": {"maxLength": 63},
    "spec.evaluate.args": {"maxProperties": 256},
    "spec.evaluate.resources.cpu": {"pattern": _QUANTITY_PATTERN},
    "spec.evaluate.resources.memory": {"pattern": _QUANTITY_PATTERN},
    "spec.publish.resources.cpu": {"pattern": _QUANTITY_PATTERN},
    "spec.publish.resources.memory": {"pattern": _QUANTITY_PATTERN},
    "spec.scheduling.nodeSelector{}": {"maxLength": 63},
    **{
        f"{step}.nodeSelector{suffix}": bound
        for step in (
            "spec.model.downloadScheduling",
            "spec.stages[].scheduling",
            "spec.merge.scheduling",
            "spec.serve.scheduling",
        )
        for suffix, bound in (("", {"maxProperties": 64}), ("{}", {"maxLength": 63}))
    },
    # Bounds for the CEL cost estimate of the "started" check (download + 16 stages + merge + serve fit).
    "status.stages": {"maxItems": 64},
}

#: The old object had a workload created (status.stages[].attempts > 0): the operator has accepted its spec.
_STARTED = (
    "has(oldSelf.status) && has(oldSelf.status.stages) && "
    "oldSelf.status.stages.exists(s, has(s.attempts) && s.attempts > 0)"
)

#: The update starts a new run: spec.runId is set and differs from the old one. That is the one way to re-run a
#: job, so it is also the one update that may change the training fields (the new run starts from scratch).
_RERUN = "(has(self.spec.runId) && (!has(oldSelf.spec.runId) || self.spec.runId != oldSelf.spec.runId))"

CelRule = tuple[str, str, str | None]


def _cel_list(items: list[str]) -> str:
    """A CEL list literal of plain strings."""
    return "[" + ", ".join(f"'{t}'" for t in items) + "]"


#: The preference stage types as a CEL list literal (``['dpo', 'rm']``), from the one constant.
_PREFERENCE = _cel_list(sorted(PREFERENCE_STAGES))


def _immutable_once_started(fields: tuple[str, ...]) -> list[CelRule]:
    rules: list[CelRule] = [
        (
            f"!({_STARTED}) || {_RERUN} || self.spec.{field} == oldSelf.spec.{field}",
            f"spec.{field} is immutable once the pipeline has started (change spec.runId to re-run with it)",
            f".spec.{field}",
        )
        for field in fields
    ]
    rules.append(
        (
            f"!({_STARTED}) || {_RERUN} || (has(self.spec.backend) == has(oldSelf.spec.backend) && "
            "(!has(self.spec.backend) || self.spec.backend == oldSelf.spec.backend))",
            "spec.backend is immutable once the pipeline has started (change spec.runId to re-run with it)",
            ".spec.backend",
        )
    )
    # Removing runId would point the next run at the unversioned folders (and the previous run's markers).
    rules.append(
        (
            f"!({_STARTED}) || !has(oldSelf.spec.runId) || has(self.spec.runId)",
            "spec.runId cannot be removed once the pipeline has started (set a new value to re-run)",
            ".spec.runId",
        )
    )
    return rules


#: CEL rules by schema path: (rule, message, fieldPath or None). Each mirrors a rule of
#: :mod:`finetune_operator.validation`, which remains the place that reports *every* error with a hint.
CEL_RULES: dict[str, list[CelRule]] = {
    "spec.publish.destinations[]": [
        (
            "(has(self.huggingface) ? 1 : 0) + (has(self.s3) ? 1 : 0) + (has(self.oci) ? 1 : 0) == 1",
            "set exactly one of huggingface, s3 or oci",
            None,
        ),
    ],
    "spec": [
        (
            "!has(self.gate) || has(self.evaluate)",
            "a gate needs spec.evaluate (it gates on the evaluation's metrics)",
            ".gate",
        ),
        (
            "self.datasets.all(d, self.datasets.exists_one(e, e.name == d.name))",
            "dataset names must be unique",
            ".datasets",
        ),
        (
            "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
            "stage names must be unique",
            ".stages",
        ),
        (
            "!has(self.runId) || (!(self.runId in ['download', 'merge', 'merged', 'serve']) && "
            "!self.stages.exists(s, s.name == self.runId))",
            "runId must not be a stage or step name",
            ".runId",
        ),
        (
            "self.stages.all(s, s.datasets.all(n, self.datasets.exists(d, d.name == n)))",
            "every stage dataset must be declared in spec.datasets",
            ".stages",
        ),
        (
            f"self.stages.all(s, !(s.type in {_PREFERENCE}) || "
            "s.datasets.all(n, self.datasets.exists(d, d.name == n && has(d.ranking) && d.ranking)))",
            "rm and dpo stages need ranking datasets (preference pairs)",
            ".stages",
        ),
        (
            f"self.stages.all(s, s.type in {_PREFERENCE} || "
            "s.datasets.all(n, !self.datasets.exists(d, d.name == n && has(d.ranking) && d.ranking)))",
            "pt, sft, ppo and kto stages cannot train on ranking datasets",
            ".stages",
        ),
        (
            "self.stages.all(s, s.type != 'kto' || s.datasets.all(n, self.datasets.exists(d, d.name == n && "
            "has(d.columns) && has(d.columns.ktoTag))))",
            "kto stages need datasets with a columns.ktoTag label column",
            ".stages",
        ),
        (
            "self.stages.all(s, !has(s.startFrom) || s.startFrom == 'base' || "
            "self.stages.exists(t, t.name == s.startFrom))",
            "startFrom must be base or the name of an earlier stage",
            ".stages",
        ),
        (
            "self.stages.all(s, !has(s.rewardModel) || !has(s.rewardModel.stage) || "
            "self.stages.exists(t, t.name == s.rewardModel.stage && t.type == 'rm'))",
            "rewardModel.stage must name an rm stage",
            ".stages",
        ),
        (
            "!has(self.merge) || !has(self.merge.stage) || self.stages.exists(t, t.name == self.merge.stage)",
            "merge.stage must name a stage",
            ".merge.stage",
        ),
    ],
    # Transition rules at the root, because "started" is in the old object's status: before the operator
    # created the first workload the spec can still be fixed (say, after an InvalidSpec condition); afterwards
    # the pipeline is a function of the spec it started with.
    "": _immutable_once_started(("model", "datasets", "stages", "output")),
    "spec.stages[]": [
        (
            "!has(self.lora) || !has(self.method) || self.method in ['lora', 'qlora']",
            "lora settings apply to methods lora and qlora only",
            ".lora",
        ),
        (
            "!(self.name in ['download', 'preflight', 'merge', 'merged', 'serve'])",
            "stage names download, preflight, merge, merged and serve are reserved",
            ".name",
        ),
        (
            "self.type == 'ppo' ? has(self.rewardModel) : !has(self.rewardModel)",
            "ppo stages need a rewardModel, and only they take one",
            ".rewardModel",
        ),
        (
            "!has(self.reference) || self.type in ['ppo', 'dpo', 'kto']",
            "reference applies to ppo, dpo and kto stages only",
            ".reference",
        ),
        (
            "!has(self.startFrom) || self.startFrom != self.name",
            "a stage cannot start from itself",
            ".startFrom",
        ),
    ],
    "spec.stages[].rewardModel": [
        ("has(self.stage) != has(self.volume)", "set exactly one of stage and volume", None),
    ],
    "spec.stages[].reference": [
        ("has(self.stage) != has(self.volume)", "set exactly one of stage and volume", None),
    ],
    "spec.datasets[]": [
        (
            "!has(self.ranking) || !self.ranking || "
            "(has(self.columns) && has(self.columns.chosen) && has(self.columns.rejected))",
            "ranking datasets need columns.chosen and columns.rejected",
            ".columns",
        ),
    ],
    "spec.serve": [
        (
            "(has(self.resources) && has(self.resources.gpusPerNode) ? self.resources.gpusPerNode : 1) == 0 || "
            "(has(self.tensorParallelSize) ? self.tensorParallelSize : 1) <= "
            "(has(self.resources) && has(self.resources.gpusPerNode) ? self.resources.gpusPerNode : 1)",
            "tensorParallelSize must not exceed serve.resources.gpusPerNode",
            ".tensorParallelSize",
        ),
    ],
    "spec.serve.env[]": [
        (
            "!has(self.valueFrom) || !has(self.value) || self.value == ''",
            "set either value or valueFrom, not both",
            ".valueFrom",
        ),
        (
            f"!(self.name in {_cel_list(sorted(OWNED_ENV | LOADER_ENV))})",
            "this variable is set by the operator or changes which code runs: it cannot be set in serve.env",
            ".name",
        ),
    ],
    "spec.scheduling.tolerations[]": [
        (
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "value must be empty when operator is Exists",
            ".value",
        ),
    ],
}

_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage", "description": "Stage in progress"},
    {"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Pipeline state"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "Step/total of the stage"},
    {"name": "Loss", "type": "string", "jsonPath": ".status.loss", "description": "Latest training loss"},
    {"name": "Metric", "type": "string", "jsonPath": ".status.metric", "description": "Gated evaluation metric"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def open_api_schema() -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of FineTuneJob."""
    raw = FineTuneJob.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    root = _convert(raw, defs, "")
    props = root["properties"]
    # apiVersion/kind are the API machinery's; metadata may only constrain name (and generateName).
    props["apiVersion"] = {"type": "string", "description": props["apiVersion"].get("description", "")}
    props["kind"] = {"type": "string", "description": props["kind"].get("description", "")}
    props["metadata"] = {
        "type": "object",
        "description": "Standard object metadata. The name is also a label value and the prefix of every child "
        "object's name: a DNS-1123 label of at most 63 characters.",
        "properties": {
            "name": {
                "type": "string",
                "maxLength": naming.MAX_NAME,
                "pattern": DNS_LABEL_PATTERN,
                "description": "Name of the FineTuneJob.",
            },
        },
    }
    root.pop("required", None)
    root["required"] = ["spec"]
    target = _at(root, "spec.stages[].lora.target")
    target.pop("anyOf", None)
    target.update({"type": "string", "maxLength": 1024, "pattern": _LORA_TARGET_PATTERN})
    target["description"] = (
        "Modules to adapt: ``all`` or a comma-separated list of module names (e.g. ``q_proj,v_proj``). "
        "ftctl also accepts a YAML list, which it joins with commas."
    )
    for free_form in ("spec.stages[].args", "spec.evaluate.args"):
        args = _at(root, free_form)
        args.pop("additionalProperties", None)
        args["x-kubernetes-preserve-unknown-fields"] = True
    for path, extra in _EXTRA.items():
        _at(root, path).update(extra)
    for path, rules in CEL_RULES.items():
        node = _at(root, path)
        node["x-kubernetes-validations"] = [
            {"rule": rule, "message": message, **({"fieldPath": fp} if fp else {})} for rule, message, fp in rules
        ]
    return root


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {c.LABEL_NAME: c.APP_NAME, c.LABEL_PART_OF: c.APP_NAME},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": c.KIND,
                "listKind": f"{c.KIND}List",
                "plural": c.PLURAL,
                "singular": c.SINGULAR,
                "shortNames": [c.SHORT_NAME],
                "categories": [c.CATEGORY],
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(_PRINTER_COLUMNS),
                }
            ],
        },
    }


# ----------------------------------------------------------------------------------------------------------
# JSON Schema -> structural OpenAPI v3
# ----------------------------------------------------------------------------------------------------------


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = dict(node)
    description = node.get("description")
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$defs"}}
        if description:  # the field's docstring wins over the model's
            merged["description"] = description
        return _convert(merged, defs, path)
    if "anyOf" in node:
        members = [m for m in node["anyOf"] if m.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(members) == 1:
            merged = {**members[0], **rest}
            if "description" in rest:
                merged["description"] = rest["description"]
            converted = _convert(merged, defs, path)
            if path.startswith(".status") and len(members) < len(node["anyOf"]):
                # The operator and workers may write explicit nulls into status; spec nulls are just pruned.
                converted["nullable"] = True
            return converted
        # A real type union (only lora.target): left for open_api_schema to resolve explicitly.
        union = {k: v for k, v in rest.items() if k not in _DROP_KEYS and k != "$defs"}
        union["anyOf"] = [_convert(m, defs, path) for m in members]
        return union
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        if key == "properties":
            out["properties"] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out["additionalProperties"] = _convert(value, defs, f"{path}{{}}")
            elif value is True and node.get("type") == "object" and "properties" not in node:
                out["additionalProperties"] = True  # free-form map: resolved by the caller (args)
            # additionalProperties false/true on a model: structural schemas prune unknown fields instead
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        values = out["enum"]
        out["type"] = "string" if all(isinstance(v, str) for v in values) else "integer"
    return out


def _at(root: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema node at ``path`` (``spec.stages[].lora``, ``...{}`` for map values; ``""`` is the root)."""
    node = root
    for part in path.split(".") if path else ():
        name = part.rstrip("[]{}")
        node = node["properties"][name]
        suffix = part[len(name) :]
        for ch in suffix:
            if ch == "[":
                node = node["items"]
            elif ch == "{":
                node = node["additionalProperties"]
    return node
