"""RBAC proof: the chart grants the operator exactly what it uses.

The operator is started as the chart starts it (arguments and environment of the rendered Deployment) against
the API-server emulator, and driven through every path that touches the API (tests/operator_session.py). The
emulator records each request as RBAC sees it (verb, group, resource, subresource, namespace, name). Then:

- every request must be allowed by the rules bound to the operator's ServiceAccount in the rendered chart
  (ClusterRole in all-namespaces mode; Roles plus a read-only ClusterRole with ``watchNamespaces``);
- every permission those rules grant must have been used by some request, unless listed in
  ``ALLOWED_UNUSED`` with the reason it is needed although the scenario does not exercise it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from finetune_operator import backends
from tests.install_tools import EXAMPLES, ROOT
from tests.operator_session import Session, session
from tests.rbac_check import Grant, Permission, Request, evaluate, grants_for, permissions, rule_allows

OPERATOR_SA = ("finetune-operator", "finetune-system")

#: Permissions granted although no recorded request used them, each with its reason. Keep it empty if you can.
_RERUN_UNSERVED = (
    "deleting the previous run's vLLM Deployment and Service when a new spec.runId disables serving; exercised "
    "by tests/test_operator_rerun.py::test_a_new_run_without_serving_removes_the_previous_server, under the "
    "same chart RBAC enforced by the emulator"
)
ALLOWED_UNUSED: dict[Permission, str] = {
    Permission("apps", "deployments", "delete"): _RERUN_UNSERVED,
    Permission("", "services", "delete"): _RERUN_UNSERVED,
}

_ADOPTION = (
    "read with a fresh GET only when a create answers 409 AlreadyExists (a lost response or a restart), "
    "to adopt the existing child; the operator's watch cache serves every other read, so whether a scenario "
    "takes this path depends on timing (Reconciler._create)"
)
#: Permissions used on paths whose occurrence depends on timing: exempt from the "unused" check (they may or
#: may not be used in a given run), never from the "allowed" check.
RACE_PATHS: dict[Permission, str] = {
    **{Permission(b.api_version.rpartition("/")[0], b.plural, "get"): _ADOPTION for b in backends.REGISTRY.values()},
    Permission("apps", "deployments", "get"): _ADOPTION,
    Permission("", "configmaps", "get"): _ADOPTION,
    Permission("", "services", "get"): _ADOPTION,
}

EXPECTED_FINAL_STATES = {
    "ml/llama3-lora-sft": "Succeeded",
    "ml/qwen-qlora": "Succeeded",
    "research/mistral-full-sft": "Serving",
    "ml/assistant-dpo": "Serving",
    "ml/llama-support-trainer": "Succeeded",
    "ml/keyed-faq": "Serving",
}


def _req(
    verb: str, group: str, resource: str, namespace: str | None = "ml", name: str | None = "x", sub: str | None = None
) -> Request:
    return Request(verb, group, "v1", resource, sub, namespace, name)


# ------------------------------------------------------------------------------------------------ the checker

RULE = {"apiGroups": ["batch"], "resources": ["jobs", "jobs/status"], "verbs": ["get", "patch"]}


@pytest.mark.parametrize(
    ("rule", "request_", "allowed"),
    [
        (RULE, _req("get", "batch", "jobs"), True),
        (RULE, _req("patch", "batch", "jobs", sub="status"), True),
        (RULE, _req("delete", "batch", "jobs"), False),  # verb
        (RULE, _req("get", "apps", "jobs"), False),  # group
        (RULE, _req("get", "batch", "cronjobs"), False),  # resource
        (RULE, _req("get", "batch", "jobs", sub="scale"), False),  # subresource is its own resource
        ({**RULE, "resourceNames": ["a"]}, _req("get", "batch", "jobs", name="a"), True),
        ({**RULE, "resourceNames": ["a"]}, _req("get", "batch", "jobs", name="b"), False),
        ({**RULE, "resourceNames": ["a"]}, _req("get", "batch", "jobs", name=None), False),
    ],
)
def test_rule_matching(rule: dict[str, Any], request_: Request, allowed: bool) -> None:
    assert rule_allows(rule, request_) is allowed


@pytest.mark.parametrize(
    "rule",
    [
        {"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["get"]},
        {"apiGroups": ["batch"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]},
        {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
    ],
)
def test_wildcards_are_refused(rule: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        permissions(rule)


def _binding(kind: str, role_kind: str, role: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"b-{role}"}
    if namespace:
        meta["namespace"] = namespace
    return {
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "sys"}],
    }


def test_bindings_scope_the_rules() -> None:
    jobs = {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}
    crds = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list"]}
    objects = [
        {"kind": "Role", "metadata": {"name": "r", "namespace": "ml"}, "rules": [jobs]},
        _binding("RoleBinding", "Role", "r", "ml"),
        {"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": [crds]},
        _binding("ClusterRoleBinding", "ClusterRole", "c"),
        # Bound to someone else: must not count.
        {"kind": "ClusterRole", "metadata": {"name": "other"}, "rules": [jobs]},
        {**_binding("ClusterRoleBinding", "ClusterRole", "other"), "subjects": [{"kind": "User", "name": "op"}]},
    ]
    grants = grants_for(objects, "op", "sys")
    assert sorted((g.source, g.namespace) for g in grants) == [("ClusterRole/c", None), ("Role/r", "ml")]
    verdict = evaluate(
        grants,
        [
            _req("get", "batch", "jobs", "ml"),
            _req("get", "batch", "jobs", "other-ns"),  # Role only applies in its namespace
            _req("list", "apiextensions.k8s.io", "customresourcedefinitions", None, None),
        ],
    )
    assert verdict.denied == [_req("get", "batch", "jobs", "other-ns")]
    assert verdict.unused == {}


def test_unused_permissions_are_reported_per_role() -> None:
    rule = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "delete"]}
    grants = [Grant("Role/r", "a", (rule,)), Grant("Role/r", "b", (rule,))]
    verdict = evaluate(grants, [_req("get", "", "configmaps", "a"), _req("create", "", "configmaps", "b")])
    assert verdict.denied == []
    assert verdict.unused == {"Role/r": [Permission("", "configmaps", "delete")]}


def test_a_binding_to_a_missing_role_is_an_error() -> None:
    with pytest.raises(ValueError, match="missing"):
        grants_for([_binding("ClusterRoleBinding", "ClusterRole", "nope")], "op", "sys")


# ------------------------------------------------------------------------------------------------ the proof


@pytest.fixture(scope="module", params=["cluster-wide", "namespaced"])
def recorded(request: pytest.FixtureRequest) -> Session:
    return session(request.param)


def test_the_scenario_ran_to_the_end(recorded: Session) -> None:
    assert recorded.final_states == EXPECTED_FINAL_STATES
    assert len(recorded.requests) > 50


def test_every_operator_request_is_allowed_by_the_chart(recorded: Session) -> None:
    grants = grants_for(recorded.chart_objects, *OPERATOR_SA)
    assert grants, "no role is bound to the operator's ServiceAccount"
    requests = [Request(*r) for r in recorded.requests]
    denied = evaluate(grants, requests).denied
    assert not denied, f"{recorded.mode}: requests the chart's RBAC would deny:\n" + "\n".join(map(str, denied))


def test_every_granted_permission_is_used(recorded: Session) -> None:
    grants = grants_for(recorded.chart_objects, *OPERATOR_SA)
    unused = evaluate(grants, [Request(*r) for r in recorded.requests]).unused
    exempt = ALLOWED_UNUSED.keys() | RACE_PATHS.keys()
    left = {src: [p for p in perms if p not in exempt] for src, perms in unused.items()}
    left = {src: perms for src, perms in left.items() if perms}
    assert not left, f"{recorded.mode}: permissions nothing used (drop them, or allowlist with a reason): {left}"


def test_allowlist_entries_have_reasons_and_are_still_needed() -> None:
    unused_anywhere: set[Permission] = set()
    for mode in ("cluster-wide", "namespaced"):
        recorded = session(mode)
        grants = grants_for(recorded.chart_objects, *OPERATOR_SA)
        for perms in evaluate(grants, [Request(*r) for r in recorded.requests]).unused.values():
            unused_anywhere.update(perms)
    for permission, reason in ALLOWED_UNUSED.items():
        assert len(reason.split()) >= 6, f"{permission}: give a reason"
        assert permission in unused_anywhere, f"{permission} is used now: remove it from ALLOWED_UNUSED"
    granted = {
        p
        for grant in grants_for(session("cluster-wide").chart_objects, *OPERATOR_SA)
        for rule in grant.rules
        for p in permissions(rule)
    }
    for permission, reason in RACE_PATHS.items():
        assert len(reason.split()) >= 6, f"{permission}: give a reason"
        assert permission in granted, f"{permission} is not granted any more: remove it from RACE_PATHS"


def test_namespaced_mode_stays_in_its_namespaces() -> None:
    recorded = session("namespaced")
    namespaces = {r.namespace for r in recorded.requests}
    assert namespaces <= {"ml", "research", None}
    cluster_scoped = {(r.group, r.resource, r.verb) for r in recorded.requests if r.namespace is None}
    assert cluster_scoped <= {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }


def test_no_secret_is_ever_requested() -> None:
    for mode in ("cluster-wide", "namespaced"):
        assert not [r for r in session(mode).requests if r.resource == "secrets"]


# ------------------------------------------------------------------------------------------------ worker pods


def test_worker_progress_reports_are_exactly_what_the_worker_role_allows(
    emulator_server: Any, tmp_path: pathlib.Path
) -> None:
    """The rank-0 worker's progress reporter (the real one, over HTTP) against its job's own Role (rendered
    into the plan; the operator creates it): allowed for its FineTuneJob, denied for any other."""
    from finetune_operator.api import constants as c
    from finetune_operator.render import identity, render
    from finetune_operator.validation import validate
    from finetune_operator.worker.progress import Progress, StatusReporter

    namespace = "default"
    emulator_server.apply_crd(ROOT / "crds")
    job = next(d for d in yaml.safe_load_all(next(EXAMPLES.glob("01-*.yaml")).read_text()) if d)
    job["metadata"]["namespace"] = namespace
    emulator_server.create(job)
    plan = render(validate(job))
    token = tmp_path / "token"
    token.write_text("worker-token")
    env = {
        "FT_JOB_NAME": job["metadata"]["name"],
        "FT_JOB_NAMESPACE": namespace,
        "FT_KUBE_API": emulator_server.url,
        "FT_KUBE_TOKEN_FILE": str(token),
    }
    emulator_server.emulator.clear_request_log()
    reporter = StatusReporter.from_env("sft", env)
    assert reporter is not None
    assert reporter.report(Progress(step=3, total_steps=10, loss=1.5, epoch=0.3), force=True)
    assert emulator_server.get(c.PLURAL + "." + c.GROUP, job["metadata"]["name"], namespace)["status"]["reported"]

    account = identity.worker_identity_name(validate(job))
    grants = grants_for(list(plan.shared), account, namespace)
    assert [(g.source, g.namespace) for g in grants] == [(f"Role/{account}", namespace)]
    verdict = evaluate(grants, [Request(*r) for r in emulator_server.emulator.request_log])
    assert verdict.denied == []
    assert verdict.unused == {}
    # The same patch of another FineTuneJob's status, or of the job itself, is denied.
    others = [
        Request("patch", c.GROUP, c.VERSION, c.PLURAL, "status", namespace, "someone-elses-job"),
        Request("patch", c.GROUP, c.VERSION, c.PLURAL, None, namespace, job["metadata"]["name"]),
        Request("get", c.GROUP, c.VERSION, c.PLURAL, None, namespace, job["metadata"]["name"]),
    ]
    assert evaluate(grants, others).denied == sorted(others, key=str)


def test_the_per_job_worker_role_is_the_worker_rules_narrowed_to_the_job() -> None:
    """render/identity.py (pure: it cannot import the controller) builds the same rules as rbac.WORKER_RULES,
    with resourceNames set to the job."""
    from finetune_operator.controller import rbac
    from finetune_operator.render import identity
    from finetune_operator.validation import validate

    job = validate(next(d for d in yaml.safe_load_all(next(EXAMPLES.glob("01-*.yaml")).read_text()) if d))
    role = next(o for o in identity.worker_identity(job) if o["kind"] == "Role")
    assert role["rules"] == [{**r.to_k8s(), "resourceNames": [job.name]} for r in rbac.WORKER_RULES]
