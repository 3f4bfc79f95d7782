"""docs/gitops.md: the Argo CD health check (Lua) for FineTuneJob runs on sample statuses with a real Lua
interpreter, and the documented manifests are well-formed.

The Lua is taken from the argocd-cm example in the document itself, so the documentation cannot drift from
what is tested.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from finetune_operator.api import constants
from finetune_operator.api.constants import ConditionType, Reason, State
from finetune_operator.api.types import FineTuneJobStatus
from tests.install_tools import EXAMPLES, ROOT

GITOPS = ROOT / "docs" / "gitops.md"
HEALTH_KEY = f"resource.customizations.health.{constants.GROUP}_{constants.KIND}"


def _yaml_blocks() -> list[dict[str, Any]]:
    text = GITOPS.read_text()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)]


@pytest.fixture(scope="module")
def health_check() -> str:
    (config_map,) = [b for b in _yaml_blocks() if b.get("kind") == "ConfigMap"]
    return str(config_map["data"][HEALTH_KEY])


def _to_lua(lua: LuaRuntime, value: Any) -> Any:
    """Python -> Lua like Argo CD's conversion of the object: objects become tables, lists 1-based arrays."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def assess(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health check the way Argo CD does: `obj` is a global, the chunk returns {status, message}."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute(script)
    return str(result["status"]), str(result["message"])


def _job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.KIND,
        "metadata": {"name": "qwen2-support", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        # Round-trip through the API type so that the samples have the exact shape the operator writes.
        obj["status"] = FineTuneJobStatus.model_validate(status).model_dump(by_alias=True, exclude_none=True)
    return obj


def _cond(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": ctype, "status": status, "reason": reason, "message": message, "observedGeneration": 1}


CASES = [
    pytest.param(None, 1, "Progressing", "Waiting for the operator", id="no-status-yet"),
    pytest.param(
        {
            "observedGeneration": 1,
            "state": State.SERVING,
            "conditions": [
                _cond(ConditionType.SUCCEEDED, "True", Reason.PIPELINE_SUCCEEDED),
                _cond(ConditionType.READY, "True", Reason.SERVING, "vLLM is available"),
            ],
            "outputs": {"endpoint": "http://qwen2-support-serve.ml.svc:8000/v1", "servedModelName": "support-bot"},
        },
        1,
        "Healthy",
        "Serving at http://qwen2-support-serve.ml.svc:8000/v1",
        id="ready-serving",
    ),
    pytest.param(
        {
            "observedGeneration": 1,
            "state": State.SUCCEEDED,
            "conditions": [_cond(ConditionType.READY, "True", Reason.PIPELINE_SUCCEEDED, "All stages succeeded")],
        },
        1,
        "Healthy",
        "All stages succeeded",
        id="ready-without-serve",
    ),
    pytest.param(
        {
            "observedGeneration": 1,
            "state": State.FAILED,
            "conditions": [
                _cond(ConditionType.FAILED, "True", Reason.RETRIES_EXHAUSTED, "stage sft failed 3 times: OOMKilled"),
                _cond(ConditionType.READY, "False", Reason.RETRIES_EXHAUSTED),
            ],
        },
        1,
        "Degraded",
        "RetriesExhausted: stage sft failed 3 times: OOMKilled",
        id="failed",
    ),
    pytest.param(
        {
            "observedGeneration": 2,
            "state": State.SUSPENDED,
            "conditions": [_cond(ConditionType.SUSPENDED, "True", Reason.SUSPENDED, "spec.suspend is true")],
        },
        2,
        "Suspended",
        "spec.suspend is true",
        id="suspended",
    ),
    pytest.param(
        {
            "observedGeneration": 1,
            "state": State.RUNNING,
            "currentStage": "sft",
            "progress": "12/100 (12%)",
            "loss": "1.2345",
            "conditions": [
                _cond(ConditionType.PROGRESSING, "True", Reason.STAGE_RUNNING),
                _cond(ConditionType.READY, "False", Reason.STAGE_RUNNING),
            ],
        },
        1,
        "Progressing",
        "stage sft, 12/100 (12%), loss 1.2345",
        id="progressing-with-progress",
    ),
    pytest.param(
        {"observedGeneration": 1, "state": State.PENDING, "conditions": []},
        1,
        "Progressing",
        "Pending",
        id="pending-no-conditions",
    ),
    pytest.param(
        # Ready from the previous generation must not count: the operator has not seen the change yet.
        {
            "observedGeneration": 1,
            "state": State.SERVING,
            "conditions": [_cond(ConditionType.READY, "True", Reason.SERVING)],
        },
        2,
        "Progressing",
        "Waiting for the operator to observe generation 2",
        id="stale-generation",
    ),
    pytest.param(
        # A failure wins over a stale Ready (e.g. a retried stage ran out of retries after serving had begun).
        {
            "observedGeneration": 1,
            "conditions": [
                _cond(ConditionType.READY, "True", Reason.SERVING),
                _cond(ConditionType.FAILED, "True", Reason.STAGE_FAILED, "serve: image pull failed"),
            ],
        },
        1,
        "Degraded",
        "StageFailed: serve: image pull failed",
        id="failed-wins-over-ready",
    ),
]


@pytest.mark.parametrize(("status", "generation", "health", "message"), CASES)
def test_argocd_health_check(
    health_check: str, status: dict[str, Any] | None, generation: int, health: str, message: str
) -> None:
    got_health, got_message = assess(health_check, _job(status, generation))
    assert got_health == health
    assert got_message.startswith(message), got_message


def test_health_check_covers_every_condition_type(health_check: str) -> None:
    """A new condition type in the API should be a conscious decision for the health check too."""
    handled = set(re.findall(r'condition\(status, "(\w+)"\)', health_check))
    assert handled == {ConditionType.READY, ConditionType.FAILED, ConditionType.SUSPENDED}
    assert handled <= set(ConditionType.ALL)


def test_health_statuses_are_argocd_ones(health_check: str) -> None:
    used = set(re.findall(r'hs\.status = "(\w+)"', health_check))
    assert used <= {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
    assert used == {"Healthy", "Progressing", "Degraded", "Suspended"}


def test_documented_manifests_are_well_formed() -> None:
    blocks = _yaml_blocks()
    kinds = {(b.get("apiVersion"), b.get("kind")) for b in blocks if isinstance(b, dict) and "kind" in b}
    assert ("argoproj.io/v1alpha1", "Application") in kinds
    assert ("kustomize.toolkit.fluxcd.io/v1", "Kustomization") in kinds
    assert ("helm.toolkit.fluxcd.io/v2", "HelmRelease") in kinds
    (kustomization,) = [b for b in blocks if b.get("kind") == "Kustomization"]
    (expr,) = kustomization["spec"]["healthCheckExprs"]
    assert (expr["apiVersion"], expr["kind"]) == (constants.API_VERSION, constants.KIND)
    assert "Failed" in expr["failed"] and "Ready" in expr["current"]
    for block in blocks:
        if block.get("kind") == "Application" and "helm" in block["spec"]["source"]:
            assert block["spec"]["source"]["path"] == "charts/finetune-operator"
            assert (ROOT / "charts" / "finetune-operator" / "Chart.yaml").is_file()


#: Runs `ftctl render -f` (the CLI's main) on each file named in argv, in one process, separated by a marker.
_RENDER_ALL = """
import sys
from finetune_operator.cli import main
for path in sys.argv[1:]:
    print("### " + path, flush=True)
    if main(["render", "-f", path]) != 0:
        sys.exit(1)
    sys.stdout.flush()
"""


def test_ftctl_render_output_is_byte_stable_across_processes() -> None:
    """What a GitOps repository commits must not change between runs: set iteration order differs between
    processes (hash randomisation), so render every example in processes with different seeds and compare."""
    examples = [str(p) for p in sorted(EXAMPLES.glob("0*.yaml"))]
    assert examples
    procs = {
        seed: subprocess.Popen(
            [sys.executable, "-c", _RENDER_ALL, *examples],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    }
    outputs = {seed: proc.communicate(timeout=300)[0] for seed, proc in procs.items()}
    assert all(proc.returncode == 0 for proc in procs.values())
    assert outputs["1"] == outputs["2"]
    assert outputs["1"].count("### ") == len(examples)
    assert "kind: ConfigMap" in outputs["1"]
