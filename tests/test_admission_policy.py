"""The chart's ValidatingAdmissionPolicy: its CEL evaluated (cel-python) with a stand-in ``authorizer``.

The policy is rendered by real Helm from the chart; every variable, match condition and validation expression
is compiled and evaluated exactly as written in the chart. The stand-in authorizer answers from a set of
(group, resource, namespace, name, verb) grants, as RBAC would for the requester; what a real API server adds
(the real authorizer chain, type-checking of the expressions against the CRD schema, cost limits) is stated
in README's security section.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

import celpy
import pydantic
import pytest
from celpy import celtypes

from finetune_operator.api.types import Backend, FineTuneJobSpec, SecretKeyRef
from finetune_operator.render import render
from finetune_operator.validation import validate
from tests.install_tools import find_helm, render_chart
from tests.test_validation import base

Grant = tuple[str, str, str, str | None, str]  # group, resource, namespace, name (None: any), verb


@dataclass(frozen=True)
class Authz:
    """A stand-in for the CEL ``authorizer``: ``group().resource().namespace().name().check().allowed()``."""

    grants: frozenset[Grant]
    path: tuple[tuple[str, str], ...] = ()

    def with_(self, field: str, value: Any) -> Authz:
        return Authz(self.grants, (*self.path, (field, str(value))))

    def check(self, verb: Any) -> celtypes.BoolType:
        d = dict(self.path)
        group, resource, ns, name = d.get("group", ""), d["resource"], d.get("namespace", ""), d.get("name")
        ok = (group, resource, ns, name, str(verb)) in self.grants or (group, resource, ns, None, str(verb)) in (
            self.grants
        )
        return celtypes.BoolType(ok)


_FUNCTIONS: dict[str, Any] = {
    **{f: (lambda field: lambda a, v: a.with_(field, v))(f) for f in ("group", "resource", "namespace", "name")},
    "check": lambda a, verb: a.check(verb),
    "allowed": lambda decision: decision,
}
_ENV = celpy.Environment()


def _eval(expr: str, activation: dict[str, Any]) -> Any:
    return _ENV.program(_ENV.compile(expr), functions=_FUNCTIONS).evaluate(activation)


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    values = {"policy": {"allowedImages": ["registry.example.com/team/worker:2"], "allowedImagePrefixes": ["ml.io/"]}}
    objects = render_chart(find_helm(), values, tmp_path=tmp_path_factory.mktemp("vap"))
    return {o["kind"]: o for o in objects if o["kind"] in ("ValidatingAdmissionPolicy", "ConfigMap")} | {
        "Binding": next(o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding")
    }


def admit(
    chart: dict[str, dict[str, Any]], obj: dict[str, Any], grants: Iterable[Grant], old: dict[str, Any] | None = None
) -> list[str]:
    """The messages of the failed validations (empty: admitted), or ``["not matched"]``."""
    policy = chart["ValidatingAdmissionPolicy"]["spec"]
    params = chart["ConfigMap"]
    ns = obj["metadata"]["namespace"]
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
        "params": celpy.json_to_cel(params),
        "request": celpy.json_to_cel({"operation": "UPDATE" if old else "CREATE", "namespace": ns}),
        "authorizer": Authz(frozenset(grants)),
    }
    for cond in policy["matchConditions"]:
        if not _eval(cond["expression"], activation):
            return ["not matched"]
    variables: dict[celtypes.StringType, Any] = {}
    for var in policy["variables"]:
        activation["variables"] = celtypes.MapType(variables)
        variables[celtypes.StringType(var["name"])] = _eval(var["expression"], activation)
    activation["variables"] = celtypes.MapType(variables)
    failed = []
    for check in policy["validations"]:
        if not _eval(check["expression"], activation):
            failed.append(str(_eval(check["messageExpression"], activation)))
    return failed


def job(**spec: Any) -> dict[str, Any]:
    obj = base()
    obj["spec"].update(spec)
    return obj


#: What a team member with the usual edit rights of the namespace ``ml`` may do.
EDITOR: frozenset[Grant] = frozenset(
    {
        ("batch", "jobs", "ml", None, "create"),
        ("apps", "deployments", "ml", None, "create"),
        ("", "services", "ml", None, "create"),
        ("", "secrets", "ml", "hf-token", "get"),
    }
)


def test_binding_points_at_the_policy_and_its_params(chart: dict[str, dict[str, Any]]) -> None:
    binding = chart["Binding"]["spec"]
    assert binding["policyName"] == chart["ValidatingAdmissionPolicy"]["metadata"]["name"]
    assert binding["paramRef"]["name"] == chart["ConfigMap"]["metadata"]["name"]
    assert binding["paramRef"]["parameterNotFoundAction"] == "Deny"
    assert binding["validationActions"] == ["Deny"]


def test_an_editor_may_create_an_ordinary_job(chart: dict[str, dict[str, Any]]) -> None:
    assert admit(chart, job(), EDITOR) == []


def test_a_secret_the_author_cannot_read_is_refused(chart: dict[str, dict[str, Any]]) -> None:
    spec = job()
    spec["spec"]["model"]["source"] = "org/model"
    spec["spec"]["model"]["tokenSecretRef"] = {"name": "db-password", "key": "password"}
    assert admit(chart, spec, EDITOR) == ["spec references Secret db-password, which the requester may not get"]
    spec["spec"]["model"]["tokenSecretRef"]["name"] = "hf-token"
    assert admit(chart, spec, EDITOR) == []


def test_secrets_in_serve_env_and_api_key_are_checked(chart: dict[str, dict[str, Any]]) -> None:
    ref = {"secretKeyRef": {"name": "other-team", "key": "k"}}
    spec = job(serve={"enabled": True, "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": ref}]})
    assert admit(chart, spec, EDITOR) == ["spec references Secret other-team, which the requester may not get"]
    spec = job(serve={"enabled": True, "apiKeySecretRef": {"name": "vllm-key", "key": "k"}})
    assert "vllm-key" in admit(chart, spec, EDITOR)[0]
    assert admit(chart, spec, EDITOR | {("", "secrets", "ml", "vllm-key", "get")}) == []


def test_workload_kinds_the_author_cannot_create_are_refused(chart: dict[str, dict[str, Any]]) -> None:
    assert admit(chart, job(backend="pytorchjob"), EDITOR) == [
        "the pipeline creates pytorchjobs.kubeflow.org, which the requester may not create in this namespace"
    ]
    assert (
        admit(chart, job(backend="pytorchjob"), EDITOR | {("kubeflow.org", "pytorchjobs", "ml", None, "create")}) == []
    )
    no_deploy = EDITOR - {("apps", "deployments", "ml", None, "create")}
    assert admit(chart, job(), no_deploy) == []  # serving off: no Deployment implied
    assert "deployments.apps" in admit(chart, job(serve={"enabled": True}), no_deploy)[0]
    # in another namespace the same person has no rights at all
    other = job()
    other["metadata"]["namespace"] = "prod"
    assert admit(chart, other, EDITOR) != []


def test_multi_node_stages_imply_a_pytorchjob(chart: dict[str, dict[str, Any]]) -> None:
    spec = job()
    spec["spec"]["stages"][0]["resources"]["nodes"] = 2
    assert "pytorchjobs.kubeflow.org" in admit(chart, spec, EDITOR)[0]


def test_images_must_be_allowed(chart: dict[str, dict[str, Any]]) -> None:
    assert admit(chart, job(image="evil.io/miner:latest"), EDITOR) == [
        "image evil.io/miner:latest is not allowed by this installation (policy.allowedImages)"
    ]
    assert admit(chart, job(image="registry.example.com/team/worker:2"), EDITOR) == []  # policy.allowedImages
    assert admit(chart, job(image="ml.io/any/worker:7"), EDITOR) == []  # policy.allowedImagePrefixes
    default_vllm = chart["ConfigMap"]["data"]["image-default-vllm"]
    assert admit(chart, job(serve={"enabled": True, "image": default_vllm}), EDITOR) == []
    assert admit(chart, job(serve={"enabled": True, "image": "registry.example.com/team/worker:3"}), EDITOR) != []


def test_the_operators_own_patches_are_not_an_authors_request(chart: dict[str, dict[str, Any]]) -> None:
    """Finalizers and annotations written by the operator leave the spec unchanged: not checked (the operator
    may not read the author's Secrets, and must not need to)."""
    old = job(image="evil.io/miner:latest")
    new = job(image="evil.io/miner:latest")
    new["metadata"]["finalizers"] = ["finetune.dev/cleanup"]
    assert admit(chart, new, frozenset(), old=old) == ["not matched"]
    changed = job(image="evil.io/miner:2")
    assert admit(chart, changed, EDITOR, old=old) != []


def test_every_backend_has_a_workload_kind_in_the_policy(chart: dict[str, dict[str, Any]]) -> None:
    """The policy's backend -> resource table agrees with what the renderer creates for each backend."""
    variables = {v["name"]: v["expression"] for v in chart["ValidatingAdmissionPolicy"]["spec"]["variables"]}
    table = _eval(variables["backendWorkloads"], {})
    for backend in get_args(Backend):
        workload = render(validate(job(backend=backend))).step("sft").workload
        group = workload["apiVersion"].rpartition("/")[0]
        resource = workload["kind"].lower() + "s"
        assert [[group, resource]] == [[str(x) for x in pair] for pair in table[backend]], backend


def _secret_fields(model: type[pydantic.BaseModel], parent: str, seen: frozenset[type] = frozenset()) -> list[str]:
    """``parent.field`` (wire names) of every SecretKeyRef field reachable from ``model``."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        alias = info.alias or name
        for member in _flatten(info.annotation):
            if member is SecretKeyRef:
                out.append(f"{parent}.{alias}")
            elif isinstance(member, type) and issubclass(member, pydantic.BaseModel) and member not in seen:
                out.extend(_secret_fields(member, alias, seen | {model}))
    return out


def _flatten(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    return [m for a in args for m in _flatten(a)] if args else [annotation]


def test_every_secret_reference_of_the_api_is_checked(chart: dict[str, dict[str, Any]]) -> None:
    """A new SecretKeyRef field in the API must be added to the policy, or an author could have the operator
    mount a Secret they cannot read."""
    variables = {v["name"]: v["expression"] for v in chart["ValidatingAdmissionPolicy"]["spec"]["variables"]}
    text = " ".join(variables[k] for k in ("secrets", "publishSecrets")).replace("\n", " ")
    fields = _secret_fields(FineTuneJobSpec, "spec")
    assert len(fields) >= 10
    missing = [f for f in fields if f not in text]
    assert missing == []


def test_tracking_and_publish_credentials_are_checked(chart: dict[str, dict[str, Any]]) -> None:
    spec = job(tracking={"wandb": {"project": "p", "apiKeySecretRef": {"name": "wandb-key", "key": "k"}}})
    assert admit(chart, spec, EDITOR) == ["spec references Secret wandb-key, which the requester may not get"]
    destinations = [
        {"name": "hub", "huggingface": {"repoId": "org/m", "tokenSecretRef": {"name": "hf-token", "key": "token"}}},
        {"name": "s3", "s3": {"bucket": "models", "secretAccessKeySecretRef": {"name": "aws-prod", "key": "k"}}},
    ]
    spec = job(merge={"enabled": True}, publish={"destinations": destinations})
    assert admit(chart, spec, EDITOR) == ["spec references Secret aws-prod, which the requester may not get"]
    assert admit(chart, spec, EDITOR | {("", "secrets", "ml", "aws-prod", "get")}) == []
