"""The chart's optional web console: absent unless enabled, read-only RBAC (FineTuneJobs get/list, nothing
else, no Secrets), restricted pod security, ClusterIP only, valid objects, in both install modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.install_tools import by_kind, find_helm, one, render_chart

K8S_VERSION = "1.30.0"
CONSOLE = "finetune-operator-console"
READ_ONLY = [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "verbs": ["get", "list"]}]
MODES: dict[str, dict[str, Any]] = {
    "cluster": {"console": {"enabled": True}},
    "namespaced": {"console": {"enabled": True}, "watchNamespaces": ["team-a", "team-b"]},
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return find_helm()


@pytest.fixture(scope="module")
def rendered(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return {name: render_chart(helm, values, tmp_path=tmp_path_factory.mktemp(name)) for name, values in MODES.items()}


def _console_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "console"]


def test_console_is_off_by_default(helm: Path, tmp_path: Path) -> None:
    assert _console_objects(render_chart(helm, {}, tmp_path=tmp_path)) == []


@pytest.mark.parametrize("mode", sorted(MODES))
def test_console_rbac_is_read_only_on_finetunejobs(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    objects = _console_objects(rendered[mode])
    roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
    assert roles, "the console needs a grant"
    for role in roles:
        assert role["rules"] == READ_ONLY, role["metadata"]
    bindings = by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": CONSOLE, "namespace": "finetune-system"}]
        assert binding["roleRef"]["name"] == CONSOLE
    if mode == "namespaced":
        assert by_kind(objects, "ClusterRole") == []
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
        assert one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == [
            "--namespace=team-a",
            "--namespace=team-b",
        ]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_console_pod_is_restricted_and_only_reachable_in_cluster(
    rendered: dict[str, list[dict[str, Any]]], mode: str
) -> None:
    objects = _console_objects(rendered[mode])
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == CONSOLE
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    (container,) = pod["containers"]
    assert container["args"][:4] == ["console", "--host=0.0.0.0", "--port=8080", "--via=direct"]
    assert container["image"] == "ghcr.io/finetune-dev/finetune-operator:0.1.0"  # the operator image
    sc = container["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"] == {"drop": ["ALL"]}
    )
    assert not any("secretKeyRef" in str(e) for e in container.get("env", []))
    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "console"
    # The operator's metrics Service never selects the console pod (distinct component label).
    metrics = one(rendered[mode], "Service", "finetune-operator-metrics")
    assert metrics["spec"]["selector"]["app.kubernetes.io/component"] == "operator"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_console_objects_are_valid(rendered: dict[str, list[dict[str, Any]]], mode: str) -> None:
    for obj in _console_objects(rendered[mode]):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_console_network_policy_lets_it_reach_the_api_and_the_jobs_vllm_pods(helm: Path, tmp_path: Path) -> None:
    """With networkPolicy.enabled the console gets its own policy, whose vLLM peer selects the pods the renderer
    actually labels (checked against a rendered serving Deployment)."""
    import yaml

    from finetune_operator.api.types import FineTuneJob
    from finetune_operator.render import render
    from tests.install_tools import EXAMPLES

    objects = render_chart(helm, {"console": {"enabled": True}, "networkPolicy": {"enabled": True}}, tmp_path=tmp_path)
    policy = one(_console_objects(objects), "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "console"
    vllm_peer = next(rule for rule in policy["spec"]["egress"] if rule["ports"] == [{"port": 8000, "protocol": "TCP"}])
    wanted = vllm_peer["to"][0]["podSelector"]["matchLabels"]
    job = FineTuneJob.model_validate(
        yaml.safe_load((EXAMPLES / "06-contract-sft-dpo-merge-serve.yaml").read_text(encoding="utf-8"))
    )
    deployments = [o for o in render(job).objects() if o["kind"] == "Deployment"]
    pod_labels = deployments[0]["spec"]["template"]["metadata"]["labels"]
    assert wanted.items() <= pod_labels.items()
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
