"""The Helm chart, rendered by the official Helm binary: lint, values, schema, RBAC shape, pod security,
validity of every object, and the derived files (chart CRD copy, manifests/install.yaml) being in sync."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from finetune_operator.api import constants
from finetune_operator.controller import rbac
from tests.install_tools import (
    CHART,
    CHART_CRD_FILE,
    CRD_FILE,
    INSTALL_YAML,
    ROOT,
    YAMLLINT_CONFIG,
    by_kind,
    find_helm,
    helm_template_text,
    load_all,
    one,
    render_chart,
    run,
    venv_tool,
)

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the validation runs against; the chart needs >= 1.25

# Values sets the chart is rendered with in the table-driven tests below.
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring-and-netpol": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "networkPolicy": {
            "enabled": True,
            "apiServerCIDRs": ["10.0.0.1/32"],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
    },
    "everything-changed": {
        "image": {"repository": "registry.example.com/ft/operator", "tag": "1.2.3", "digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "defaults": {"workerImage": "registry.example.com/ft/worker:1.2.3", "vllmImage": "registry.example.com/vllm:9"},
        "worker": {"create": True, "namespaces": ["ml", "ml-dev"]},
        "logLevel": "debug",
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
        "serviceAccount": {"name": "ft-op", "annotations": {"example.com/role": "x"}},
        "metrics": {"service": {"enabled": False}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "extraEnv": [{"name": "FT_EXTRA", "value": "1"}],
        "commonLabels": {"team": "ml-platform"},
    },
}


@pytest.fixture(scope="session")
def helm() -> Path:
    return find_helm()


@pytest.fixture(scope="session")
def rendered(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The chart rendered once per values set (Helm takes ~50 ms, the parsing dominates)."""
    tmp = tmp_path_factory.mktemp("values")
    return {name: render_chart(helm, values, tmp_path=tmp) for name, values in NON_DEFAULT.items()}


def _operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --------------------------------------------------------------------------------------------------------------
# Lint and schema
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_helm_lint_strict(helm: Path, tmp_path: Path, name: str) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT[name]))
    proc = run([helm, "lint", "--strict", CHART, "--values", values])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "logLevel=trace"], "logLevel"),
        (["--set", "watchNamespaces[0]=Team_A"], "watchNamespaces"),
        (["--set", "defaults.workerImage="], "workerImage"),
        (["--set", "ports.metrics=70000"], "metrics"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "replicaCount=2"], "replicaCount"),  # not a value: the operator is a singleton
        (["--set", "networkPolicy.apiServerCIDRs[0]=kubernetes"], "apiServerCIDRs"),
    ],
)
def test_values_schema_rejects_bad_values_with_a_message(helm: Path, args: list[str], expected: str) -> None:
    proc = run([helm, "template", "x", CHART, *args], check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert expected in proc.stderr, proc.stderr


def test_service_monitor_without_service_fails_with_a_message(helm: Path) -> None:
    proc = run(
        [
            helm,
            "template",
            "x",
            CHART,
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.service.enabled=false",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled" in proc.stderr


def test_schema_covers_every_value_and_rejects_unknown_keys_everywhere() -> None:
    """A key in values.yaml that the schema does not describe would make `additionalProperties: false` reject
    the chart's own defaults; a nested object without it would let typos through silently."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], data: Any, path: str) -> None:
        if node.get("type") != "object" or "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{path or '<root>'}: additionalProperties must be false"
        if isinstance(data, dict):
            for key, value in data.items():
                assert key in node["properties"], f"{path}.{key} is in values.yaml but not in the schema"
                walk(node["properties"][key], value, f"{path}.{key}")

    walk(schema, values, "")


def test_default_images_agree_with_the_operator_constants() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["defaults"]["workerImage"] == constants.DEFAULT_WORKER_IMAGE
    assert values["defaults"]["vllmImage"] == constants.DEFAULT_VLLM_IMAGE
    assert values["worker"]["serviceAccountName"] == constants.DEFAULT_WORKER_SERVICE_ACCOUNT


def test_chart_version_follows_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    import tomllib

    version = tomllib.loads(pyproject)["project"]["version"]
    assert chart["appVersion"] == version
    assert constants.DEFAULT_WORKER_IMAGE.endswith(f":{version}")


# --------------------------------------------------------------------------------------------------------------
# What is rendered
# --------------------------------------------------------------------------------------------------------------


def test_default_render_creates_the_documented_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["default"]
    kinds = sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace", "")) for o in objects)
    assert kinds == [
        ("ClusterRole", "finetune-operator", ""),
        ("ClusterRoleBinding", "finetune-operator", ""),
        ("ConfigMap", "finetune-operator-no-borrowed-privileges-params", "finetune-system"),
        ("CustomResourceDefinition", f"{constants.PLURAL}.{constants.GROUP}", ""),
        ("Deployment", "finetune-operator", "finetune-system"),
        ("Service", "finetune-operator-metrics", "finetune-system"),
        ("ServiceAccount", "finetune-operator", "finetune-system"),
        ("ValidatingAdmissionPolicy", "finetune-operator-no-borrowed-privileges", ""),
        ("ValidatingAdmissionPolicyBinding", "finetune-operator-no-borrowed-privileges", ""),
    ]
    # Workers get a ServiceAccount per FineTuneJob from the operator: no shared one, and no env to choose it.
    assert "FT_WORKER_SERVICE_ACCOUNT" not in _env(_operator_container(objects))


def test_a_shared_worker_account_is_opt_in(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """``worker.create: true``: one shared account per namespace, and the operator is told to use it (so it
    needs no permission to create ServiceAccounts and Roles)."""
    objects = rendered["everything-changed"]
    assert _env(_operator_container(objects))["FT_WORKER_SERVICE_ACCOUNT"] == "finetune-worker"
    rules = one(objects, "ClusterRole")["rules"]
    assert not [r for r in rules if {"serviceaccounts", "roles", "rolebindings"} & set(r["resources"])]


def test_operator_is_a_singleton_with_recreate(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for objects in rendered.values():
        spec = one(objects, "Deployment")["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_operator_pod_meets_restricted_pod_security(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    pod = one(rendered[name], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True  # the operator calls the API
    assert "hostNetwork" not in pod and "hostPID" not in pod
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["port"] == "health"


def test_service_accounts_do_not_automount_tokens(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Pods opt in one by one: the operator pod above, and the worker pod that reports progress."""
    for objects in rendered.values():
        for sa in by_kind(objects, "ServiceAccount"):
            assert sa["automountServiceAccountToken"] is False, sa["metadata"]["name"]


def test_default_operator_args_and_env(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = _operator_container(rendered["default"])
    assert container["image"] == "ghcr.io/finetune-dev/finetune-operator:0.1.0"
    assert container["args"][:2] == ["operator", "--all-namespaces"]
    assert not {"--verbose", "--debug"} & set(container["args"])
    env = _env(container)
    assert env["FT_WORKER_IMAGE"] == constants.DEFAULT_WORKER_IMAGE
    assert env["FT_VLLM_IMAGE"] == constants.DEFAULT_VLLM_IMAGE
    assert "FT_WORKER_SERVICE_ACCOUNT" not in env  # per-job worker accounts


def test_non_default_values_reach_the_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["everything-changed"]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _operator_container(objects)
    assert container["image"] == "registry.example.com/ft/operator:1.2.3@sha256:" + "a" * 64
    assert "--debug" in container["args"]
    env = _env(container)
    assert env["FT_WORKER_IMAGE"] == "registry.example.com/ft/worker:1.2.3"
    assert env["FT_VLLM_IMAGE"] == "registry.example.com/vllm:9"
    assert env["FT_EXTRA"] == "1"
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "2", "memory": "1Gi"},
    }
    assert pod["serviceAccountName"] == "ft-op"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert not by_kind(objects, "Service")
    assert all(
        o["metadata"]["labels"]["team"] == "ml-platform" for o in objects if o["kind"] != "CustomResourceDefinition"
    )
    worker_namespaces = sorted(
        sa["metadata"]["namespace"]
        for sa in by_kind(objects, "ServiceAccount")
        if sa["metadata"]["name"] == "finetune-worker"
    )
    assert worker_namespaces == ["ml", "ml-dev"]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ft-op", "namespace": "finetune-system"}]


def test_watch_namespaces_gives_roles_not_a_cluster_wide_grant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["namespaced"]
    container = _operator_container(objects)
    assert "--all-namespaces" not in container["args"]
    assert [a for a in container["args"] if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]

    operator_roles = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == "finetune-operator"]
    assert sorted(r["metadata"]["namespace"] for r in operator_roles) == ["team-a", "team-b"]
    bindings = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"] == "finetune-operator"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "finetune-operator",
        }
        assert binding["subjects"][0]["namespace"] == "finetune-system"

    # The only ClusterRole reads cluster-scoped objects; it grants nothing on namespaced resources.
    (cluster_role,) = by_kind(objects, "ClusterRole")
    for rule in cluster_role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert set(rule["resources"]) <= {"customresourcedefinitions", "namespaces"}
    # Both modes grant the same namespaced rules.
    cluster_wide = one(rendered["default"], "ClusterRole")["rules"]
    assert all(rule in cluster_wide for rule in operator_roles[0]["rules"])

    worker_sas = [s for s in by_kind(objects, "ServiceAccount") if s["metadata"]["name"] == "finetune-worker"]
    assert worker_sas == []  # per-job worker accounts, created by the operator


def test_service_monitor_and_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["monitoring-and-netpol"]
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["finetune-system"]}

    policy = one(objects, "NetworkPolicy")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"] == NON_DEFAULT["monitoring-and-netpol"]["networkPolicy"]["metricsFrom"]
    api, dns = policy["spec"]["egress"]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert {p["port"] for p in api["ports"]} == {443, 6443}
    assert {p["port"] for p in dns["ports"]} == {53}
    for name in ("default", "namespaced"):
        assert not by_kind(rendered[name], "ServiceMonitor")
        assert not by_kind(rendered[name], "NetworkPolicy")


def test_notes_render(helm: Path) -> None:
    proc = run(
        [helm, "install", "ft", CHART, "--dry-run=client", "--namespace", "ml-ops", "--set", "watchNamespaces={team-a}"]
    )
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "It watches FineTuneJobs in: team-a." in notes
    assert "kubectl -n ml-ops rollout status deployment/ft-finetune-operator" in notes


# --------------------------------------------------------------------------------------------------------------
# RBAC shape (what the operator actually uses is proven in tests/test_rbac.py)
# --------------------------------------------------------------------------------------------------------------

FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate", "deletecollection"}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_rbac_has_no_wildcards_and_no_secret_access(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    for role in by_kind(rendered[name], "ClusterRole") + by_kind(rendered[name], "Role"):
        for rule in role["rules"]:
            where = f"{role['kind']} {role['metadata']['name']}: {rule}"
            assert "*" not in rule.get("apiGroups", []) and "*" not in rule["resources"], where
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), where
            assert not {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule["resources"]), where
            assert "nonResourceURLs" not in rule, where


def test_worker_role_allows_only_status_patch(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for objects in rendered.values():
        for role in by_kind(objects, "Role"):
            if role["metadata"]["name"] != constants.DEFAULT_WORKER_SERVICE_ACCOUNT:
                continue
            assert role["rules"] == [
                {"apiGroups": [constants.GROUP], "resources": [f"{constants.PLURAL}/status"], "verbs": ["patch"]}
            ]
            ns = role["metadata"]["namespace"]
            binding = one(
                [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["namespace"] == ns],
                "RoleBinding",
                constants.DEFAULT_WORKER_SERVICE_ACCOUNT,
            )
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": constants.DEFAULT_WORKER_SERVICE_ACCOUNT, "namespace": ns}
            ]


# --------------------------------------------------------------------------------------------------------------
# Validity of every object
# --------------------------------------------------------------------------------------------------------------


def _validate_service_monitor(obj: dict[str, Any]) -> None:
    """kubernetes-validate has no schema for the Prometheus Operator CRD: check the fields it requires."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["spec"]["selector"]["matchLabels"]
    for endpoint in obj["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_every_rendered_object_is_valid(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    """Core kinds and the CRD (apiextensions.k8s.io/v1) against the Kubernetes OpenAPI schemas, strictly
    (unknown fields are errors)."""
    for obj in rendered[name]:
        if obj["kind"] == "ServiceMonitor":
            _validate_service_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc}") from exc


def test_invalid_objects_are_caught_by_the_validator(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validator above would catch a broken template (a guard against a validator that accepts anything)."""
    deployment = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    crd = json.loads(json.dumps(one(rendered["default"], "CustomResourceDefinition")))
    crd["spec"]["scope"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Derived files and YAML hygiene
# --------------------------------------------------------------------------------------------------------------


def test_chart_crd_is_a_copy_of_the_generated_crd() -> None:
    assert CRD_FILE.is_file(), f"{CRD_FILE.relative_to(ROOT)} is missing"
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), (
        "charts/finetune-operator/crds/ is out of date: run scripts/render-install.sh"
    )


def test_rbac_rule_templates_are_generated_from_the_one_definition() -> None:
    """charts/.../_rbac_rules.tpl is generated from finetune_operator/controller/rbac.py: regenerate, never edit."""
    committed = (ROOT / rbac.CHART_FILE).read_text(encoding="utf-8")
    assert committed == rbac.chart_template(), "stale: run python -m finetune_operator.controller.rbac"


def test_chart_grants_exactly_the_rules_of_the_one_definition(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Both install modes and the worker Role carry the generated rules, nothing else."""
    objects = rendered["default"]
    role = next(o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "finetune-operator")
    identity = rbac.WORKER_IDENTITY_RULES
    assert role["rules"] == [r.to_k8s() for r in (*rbac.NAMESPACED_RULES, *identity, *rbac.CLUSTER_RULES)]
    shared = rendered["everything-changed"]  # worker.create: true
    worker = next(o for o in shared if o["kind"] == "Role" and o["metadata"]["name"] == "finetune-worker")
    assert worker["rules"] == [r.to_k8s() for r in rbac.WORKER_RULES]
    shared_role = next(o for o in shared if o["kind"] == "ClusterRole")
    assert shared_role["rules"] == [r.to_k8s() for r in (*rbac.NAMESPACED_RULES, *rbac.CLUSTER_RULES)]
    namespaced = rendered["namespaced"]
    roles = [o for o in namespaced if o["kind"] == "Role" and o["metadata"]["name"] == "finetune-operator"]
    expected = [x.to_k8s() for x in (*rbac.NAMESPACED_RULES, *rbac.WORKER_IDENTITY_RULES)]
    assert roles and all(r["rules"] == expected for r in roles)
    cluster = next(o for o in namespaced if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-cluster"))
    assert cluster["rules"] == [r.to_k8s() for r in (*rbac.CLUSTER_RULES, *rbac.NAMESPACE_WATCH_RULES)]


def test_install_yaml_is_the_chart_rendered_with_default_values(helm: Path) -> None:
    """manifests/install.yaml must be regenerated whenever the chart changes."""
    expected = run(
        [ROOT / "scripts" / "render-install.sh", "--stdout"], env={"HELM": str(helm), "PATH": "/usr/bin:/bin"}
    )
    assert INSTALL_YAML.read_text() == expected.stdout, (
        "manifests/install.yaml is out of date: run scripts/render-install.sh"
    )


def test_install_yaml_is_complete_and_valid() -> None:
    objects = load_all(INSTALL_YAML.read_text())
    assert objects[0] == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": "finetune-system",
            "labels": {
                "app.kubernetes.io/name": "finetune-operator",
                "app.kubernetes.io/part-of": "finetune-operator",
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/audit": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            },
        },
    }
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
        if obj["kind"] not in cluster_scoped | {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}:
            assert obj["metadata"]["namespace"] in {"finetune-system", "default"}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_rendered_chart_passes_yamllint(helm: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.yaml"
    out.write_text(helm_template_text(helm, NON_DEFAULT[name], tmp_path=tmp_path))
    run([venv_tool("yamllint"), "--strict", "-c", YAMLLINT_CONFIG, out])


def test_repository_yaml_passes_yamllint() -> None:
    paths = [
        ROOT / "manifests",
        ROOT / "crds",
        CHART / "crds",
        CHART / "values.yaml",
        CHART / "Chart.yaml",
        YAMLLINT_CONFIG,
    ]
    run([venv_tool("yamllint"), "--strict", "-c", YAMLLINT_CONFIG, *[p for p in paths if p.exists()]])


def test_yamllint_config_catches_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb: yes\n")
    proc = run([venv_tool("yamllint"), "--strict", "-c", YAMLLINT_CONFIG, bad], check=False)
    assert proc.returncode != 0
    assert "duplication of key" in proc.stdout and "truthy" in proc.stdout


def test_probes_and_metrics_answer_on_the_charts_ports() -> None:
    """The operator started with the chart's arguments serves the probe path and /metrics on the ports the
    Deployment declares (a recorded session, shared with the RBAC and secrets tests)."""
    from tests.operator_session import session

    probes = session("cluster-wide").probes
    assert probes["liveness"][0] == 200, probes["liveness"]
    assert probes["readiness"][0] == 200, probes["readiness"]
    status, body = probes["metrics"]
    assert status == 200, body
    assert "# TYPE" in body and "finetune" in body
