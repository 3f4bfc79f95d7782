"""Hub tokens only ever travel as ``secretKeyRef``: a canary token must never show up anywhere we write.

Two levels:

- ``ftctl render`` of FineTuneJobs whose ``model.tokenSecretRef`` names a Secret, run with the canary in the
  environment variables a user may have exported (HF_TOKEN & co.): the canary is nowhere in the output or the
  errors, and the token reaches only the download container, as ``env.valueFrom.secretKeyRef``.
- End to end (tests/operator_session.py): the operator, started as the chart starts it, runs pipelines whose
  Secret holds the canary. Afterwards the canary is in no object of the cluster but that Secret (ConfigMaps,
  workloads, FineTuneJob status and annotations, Events), and in no line of the operator's log.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api import constants as c
from finetune_operator.render import secretcheck
from tests.install_tools import EXAMPLES, load_all, venv_tool
from tests.operator_session import CANARY, TOKEN_SECRET, session

CANARY_FORMS = (CANARY, base64.b64encode(CANARY.encode()).decode())
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "FT_HF_TOKEN")
WITH_TOKEN = [p for p in sorted(EXAMPLES.glob("0*.yaml")) if "tokenSecretRef" in p.read_text()]


def _assert_no_canary(text: str, where: str) -> None:
    for form in CANARY_FORMS:
        assert form not in text, f"the canary token leaked into {where}"


def _containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, container) of every container in every pod template nested in ``obj``."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list) and all(isinstance(x, dict) and "image" in x for x in node[key]):
                    found.extend((f"{path}.{key}[{x.get('name')}]", x) for x in node[key])
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(obj, f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}")
    return found


def _secret_uses(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, Any]]:
    """(object, where, reference) of every reference to a Secret in pod templates: env, envFrom, volumes."""
    uses: list[tuple[dict[str, Any], str, Any]] = []
    for obj in objects:
        for where, container in _containers(obj):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref is not None:
                    uses.append((obj, f"{where}.env[{env['name']}]", ref))
            for source in container.get("envFrom") or []:
                if "secretRef" in source:
                    uses.append((obj, f"{where}.envFrom", source["secretRef"]))
        text = json.dumps(obj)
        if '"secret": {' in text or '"secretName"' in text:
            uses.append((obj, "volumes", "secret volume"))
    return uses


def _without_secret_check(
    objects: list[dict[str, Any]], uses: list[tuple[dict[str, Any], str, Any]]
) -> list[tuple[dict[str, Any], str, Any]]:
    """The uses other than the Secret check (render/secretcheck.py), after checking that one: only in the first
    Job of the plan, an init container that runs ``true`` (reads and prints nothing), each key once."""
    check = f".initContainers[{secretcheck.CONTAINER}]"
    first_job = next(o for o in objects if o.get("kind") == "Job")
    checked = [(obj, where, ref) for obj, where, ref in uses if check in where]
    for obj, where, _ref in checked:
        assert obj is first_job, f"{where}: the Secret check runs in the first Job only"
    for obj in {id(o): o for o, _, _ in checked}.values():
        (init,) = [x for _, x in _containers(obj) if x["name"] == secretcheck.CONTAINER]
        assert init["command"] == ["true"] and "args" not in init
        assert len(checked) == len({(r["name"], r["key"]) for _, _, r in checked})
    return [u for u in uses if check not in u[1]]


def _check_token_only_in_download(objects: list[dict[str, Any]], secret: dict[str, str]) -> None:
    uses = _secret_uses(objects)
    assert uses, "the download pod gets the token from the Secret"
    for obj, where, ref in uses:
        assert obj["kind"] == "Job", where
        assert obj["metadata"]["labels"][c.LABEL_COMPONENT] == "download", f"token outside the download pod: {where}"
        assert where.endswith(".env[HF_TOKEN]"), where
        assert (ref["name"], ref["key"]) == (secret["name"], secret["key"]), where
        assert ref.get("optional") in (None, False), f"{where}: a missing Secret must stop the pod, not be ignored"
    # No other container has a token variable at all (set literally, or from anywhere else).
    for obj in objects:
        for where, container in _containers(obj):
            for env in container.get("env") or []:
                if env["name"] in TOKEN_ENV:
                    assert "value" not in env, f"{where}: a token variable with a literal value"


# ------------------------------------------------------------------------------------------------ render


@pytest.fixture(scope="module")
def canary_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(dict.fromkeys(TOKEN_ENV, CANARY))
    return env


@pytest.mark.parametrize("example", WITH_TOKEN, ids=[p.name for p in WITH_TOKEN])
def test_render_passes_the_token_only_by_reference(example: Path, canary_env: dict[str, str]) -> None:
    assert WITH_TOKEN, "an example uses model.tokenSecretRef"
    doc = next(d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == c.KIND)
    proc = subprocess.run(
        [venv_tool("ftctl"), "render", "-f", example], capture_output=True, text=True, env=canary_env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    _assert_no_canary(proc.stdout + proc.stderr, f"ftctl render of {example.name}")
    _check_token_only_in_download(load_all(proc.stdout), doc["spec"]["model"]["tokenSecretRef"])


TRACKER_ENV = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
TRACKING = EXAMPLES / "23-experiment-trackers.yaml"


def test_render_passes_tracker_credentials_only_by_reference_into_training_pods(canary_env: dict[str, str]) -> None:
    """spec.tracking: the W&B key and the MLflow token reach training pods only, as secretKeyRef; a canary in
    the environment of whoever renders goes nowhere."""
    env = {**canary_env, **dict.fromkeys(TRACKER_ENV, CANARY)}
    proc = subprocess.run(
        [venv_tool("ftctl"), "render", "-f", TRACKING], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    _assert_no_canary(proc.stdout + proc.stderr, f"ftctl render of {TRACKING.name}")
    objects = load_all(proc.stdout)
    uses = _without_secret_check(objects, _secret_uses(objects))
    assert {where.rsplit("[", 1)[1].rstrip("]") for _, where, _ in uses} == {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN"}
    for obj, where, ref in uses:
        assert obj["metadata"]["labels"][c.LABEL_COMPONENT] == "train", f"tracker credentials outside training: {where}"
        assert ref in ({"name": "wandb", "key": "api-key"}, {"name": "mlflow", "key": "token"}), where
    for obj in objects:
        for where, container in _containers(obj):
            for env_var in container.get("env") or []:
                if env_var["name"] in TRACKER_ENV:
                    assert "value" not in env_var, f"{where}: a credential with a literal value"


def test_render_errors_do_not_echo_secret_values(tmp_path: Path, canary_env: dict[str, str]) -> None:
    """A Secret pasted into the job file by mistake is refused without its value being printed."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": TOKEN_SECRET["name"]},
        "stringData": {TOKEN_SECRET["key"]: CANARY},
        "data": {"token": CANARY_FORMS[1]},
    }
    job = next(d for d in yaml.safe_load_all(WITH_TOKEN[0].read_text()) if d and d.get("kind") == c.KIND)
    job["spec"]["model"]["tokenSecretRef"] = {"name": CANARY, "key": "token"}  # not a DNS name: an error
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([secret, job]))
    proc = subprocess.run(
        [venv_tool("ftctl"), "render", "-f", path], capture_output=True, text=True, env=canary_env, timeout=120
    )
    assert proc.returncode != 0
    # The Secret is skipped, as ftctl validate skips documents of other kinds (named, never printed) ...
    assert "skipped document 1 (Secret)" in proc.stderr
    assert "spec.model.tokenSecretRef.name" in proc.stderr  # ... and the error names the field...
    _assert_no_canary(proc.stdout + proc.stderr, "ftctl render's error messages")  # ...not the value


# ------------------------------------------------------------------------------------------------ operator


@pytest.fixture(scope="module")
def recorded() -> Any:
    return session("cluster-wide")


def test_operator_session_downloaded_with_the_secret(recorded: Any) -> None:
    downloads = [
        o
        for o in recorded.objects
        if o.get("kind") == "Job" and o["metadata"].get("labels", {}).get(c.LABEL_COMPONENT) == "download"
    ]
    assert downloads, "the scenario ran a download stage"
    workloads = [
        o
        for o in recorded.objects
        if o.get("kind") in ("Job", "PyTorchJob", "DeepSpeedJob", "Deployment")
        and o["metadata"].get("labels", {}).get(c.LABEL_JOB) != KEYED
    ]
    _check_token_only_in_download(workloads, TOKEN_SECRET)


KEYED = "keyed-faq"


def test_operator_session_served_with_the_api_key_only_by_reference(recorded: Any) -> None:
    """serve.apiKeySecretRef (the canary Secret): the key reaches the vLLM container (VLLM_API_KEY) and the answer
    Job's pod (FT_API_KEY, ``ftctl worker answer``), each only as a secretKeyRef, and no other object of that job."""
    objects = [o for o in recorded.objects if o["metadata"].get("labels", {}).get(c.LABEL_JOB) == KEYED]
    uses = _without_secret_check(objects, _secret_uses(objects))
    found = {
        (o["kind"], o["metadata"]["labels"][c.LABEL_COMPONENT], where.rsplit("[", 1)[1].rstrip("]"))
        for o, where, _ in uses
    }
    assert found == {("Deployment", "serve", "VLLM_API_KEY"), ("Job", "answer", "FT_API_KEY")}, found
    for _obj, where, ref in uses:
        assert ref == TOKEN_SECRET, where
    (answer_job,) = [
        o for o in objects if o.get("kind") == "Job" and o["metadata"]["labels"][c.LABEL_COMPONENT] == "answer"
    ]
    pod = answer_job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["command"][:3] == ["ftctl", "worker", "answer"]
    assert all("value" not in e for e in container["env"] if e["name"] == "FT_API_KEY")


def test_canary_is_in_no_object_but_its_secret(recorded: Any) -> None:
    secrets = [o for o in recorded.objects if o.get("kind") == "Secret"]
    assert secrets and any(CANARY in json.dumps(s) for s in secrets), "the scenario's Secret holds the canary"
    kinds = set()
    for obj in recorded.objects:
        if obj.get("kind") == "Secret":
            continue
        kinds.add(obj.get("kind"))
        _assert_no_canary(json.dumps(obj), f"{obj.get('kind')} {obj['metadata'].get('name')}")
    # The places the issue names were all produced and checked.
    assert {"ConfigMap", "Event", "FineTuneJob", "Job", "Deployment"} <= kinds
    ftjs = [o for o in recorded.objects if o.get("kind") == "FineTuneJob"]
    assert all(o.get("status") and o["metadata"].get("annotations") for o in ftjs)


def test_canary_is_in_no_operator_log_line(recorded: Any) -> None:
    assert recorded.operator_log.strip(), "the operator logged something"
    for line in recorded.operator_log.splitlines():
        _assert_no_canary(line, f"the operator log line {line[:80]!r}")
