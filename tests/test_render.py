"""The renderer: golden files, determinism, injection safety, schemas of every object, pipeline semantics.

Golden files live in tests/golden/<example>.yaml; regenerate them with ``UPDATE_GOLDEN=1 pytest
tests/test_render.py`` and review the diff like code.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from finetune_operator import backends
from finetune_operator.api import constants as c
from finetune_operator.api.naming import is_dns_label
from finetune_operator.api.types import DeepSpeedSpec, FineTuneJob
from finetune_operator.errors import RenderError
from finetune_operator.render import (
    PathResolver,
    RenderOptions,
    config_files,
    identity,
    render,
    render_yaml,
    suspend_path,
    vllm_command,
    worker_command,
)
from finetune_operator.render import llamafactory as lf
from finetune_operator.render.deepspeed import deepspeed_config
from finetune_operator.render.dump import to_yaml
from finetune_operator.validation import load_documents, validate

ROOT = Path(__file__).resolve().parent.parent
#: The numbered, documented examples (other files in the folder, such as the local demo, belong to their areas).
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("[0-9][0-9]-*.yaml"))
#: The contract example: every step, serve included.
CONTRACT = next(p for p in EXAMPLES if p.name.startswith("06-"))
GOLDEN = Path(__file__).parent / "golden"
CRDS = Path(__file__).parent / "fixtures" / "crds"
#: Kubernetes version the core objects are validated against (kubernetes-validate bundles 1.25-1.37).
K8S_VERSION = "1.33.0"


def _example(path: Path) -> FineTuneJob:
    (doc,) = load_documents(path)
    return validate(doc)


def _raw(path: Path) -> dict[str, Any]:
    (doc,) = load_documents(path)
    return doc


@pytest.fixture(scope="module", params=EXAMPLES, ids=[p.stem for p in EXAMPLES])
def example(request: pytest.FixtureRequest) -> Path:
    return request.param  # type: ignore[no-any-return]


def _all_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in EXAMPLES:
        for obj in render(_example(p)).objects():
            out.append((f"{p.stem}:{obj['kind']}/{obj['metadata']['name']}", obj))
    return out


ALL_OBJECTS = _all_objects()


def _pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    kind = obj["kind"]
    if kind in ("Job", "Deployment"):
        return [obj["spec"]["template"]]
    if kind == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if kind == "DeepSpeedJob":
        return [obj["spec"]["worker"]["template"]]
    return []


# ------------------------------------------------------------------------------------------------------------
# Golden files and determinism
# ------------------------------------------------------------------------------------------------------------


def test_examples_exist() -> None:
    numbers = [p.name[:2] for p in EXAMPLES]
    assert {"01", "02", "03", "04", "05", "06", "07"} <= set(numbers)
    assert len(numbers) == len(set(numbers)), "two examples share a number"


def test_golden(example: Path) -> None:
    text = render_yaml(_example(example))
    golden = GOLDEN / f"{example.stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"{golden} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == golden.read_text(encoding="utf-8"), f"render of {example.name} differs from {golden.name}"


def _shuffled(value: Any, rng: random.Random) -> Any:
    """The same value with every dict rebuilt in a random key order (lists keep their order)."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {k: _shuffled(value[k], rng) for k in keys}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def test_deterministic(example: Path) -> None:
    raw = _raw(example)
    first = render_yaml(validate(raw))
    assert render_yaml(validate(copy.deepcopy(raw))) == first
    orders = set()
    for seed in range(5):
        shuffled = _shuffled(raw, random.Random(seed))
        orders.add(json.dumps(shuffled))
        assert render_yaml(validate(shuffled)) == first
    assert len(orders) > 1  # the shuffles really changed insertion order


def test_deterministic_across_processes() -> None:
    """Python's per-process hash seed must not leak into the output (set iteration, dict-of-sets...)."""
    path = CONTRACT
    code = (
        "import sys; from finetune_operator.validation import load_documents, validate;"
        "from finetune_operator.render import render_yaml;"
        f"sys.stdout.write(render_yaml(validate(load_documents({str(path)!r})[0])))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": s},
        ).stdout
        for s in ("1", "2", "3")
    }
    assert len(outs) == 1


# ------------------------------------------------------------------------------------------------------------
# Injection: user strings never become YAML structure
# ------------------------------------------------------------------------------------------------------------

EVIL = "x\n---\nkind: Secret\nmetadata: {name: stolen}\n"


@pytest.mark.parametrize("where", ["servedModelName", "datasetSubPath", "template", "servedEnv"])
def test_injection_creates_no_object(where: str) -> None:
    raw = _raw(CONTRACT)  # the contract example: every step, serve included
    baseline = render(FineTuneJob.model_validate(raw))
    evil = copy.deepcopy(raw)
    if where == "servedModelName":
        # The type refuses it now (a model id has no newlines); the renderer must still be safe without that.
        refused = copy.deepcopy(raw)
        refused["spec"]["serve"]["servedModelName"] = EVIL
        with pytest.raises(pydantic.ValidationError):
            FineTuneJob.model_validate(refused)
    elif where == "datasetSubPath":
        evil["spec"]["datasets"][0]["volume"]["subPath"] = EVIL
    elif where == "template":
        evil["spec"]["model"]["template"] = EVIL
    else:
        evil["spec"]["serve"]["env"] = [{"name": "X", "value": EVIL}]
    # Shape-validated only: the renderer must be safe even for input the semantic checks would reject.
    job = FineTuneJob.model_validate(evil)
    if where == "servedModelName":
        job.spec.serve.served_model_name = EVIL
    plan = render(job)
    text = render_yaml(job)
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(docs) == len(baseline.objects()) == len(plan.objects())
    assert [d["kind"] for d in docs] == [o["kind"] for o in baseline.objects()]
    assert "Secret" not in {d["kind"] for d in docs}
    assert docs == plan.objects()  # the dump round-trips exactly
    # ... and the files inside the ConfigMap still parse to the values that went in.
    data = docs[0]["data"]
    for key, value in data.items():
        parsed = json.loads(value) if key.endswith(".json") else yaml.safe_load(value)
        assert isinstance(parsed, dict), key
    if where == "datasetSubPath":
        info = json.loads(data["dataset_info.json"])
        assert info["support_chat"]["file_name"].endswith(EVIL.strip("/"))
    if where == "template":
        assert yaml.safe_load(data["sft.yaml"])["template"] == EVIL


# ------------------------------------------------------------------------------------------------------------
# Schemas: core objects with kubernetes-validate, CRDs with their upstream schemas
# ------------------------------------------------------------------------------------------------------------

CORE = [(i, o) for i, o in ALL_OBJECTS if o["apiVersion"] in ("v1", "batch/v1", "apps/v1")]
#: Workload kinds of the backends that are custom resources (every backend but batch/v1 Job).
CUSTOM_KINDS = {b.kind for b in backends.REGISTRY.values() if b.api_version != "batch/v1"}
CUSTOM = [(i, o) for i, o in ALL_OBJECTS if o["kind"] in CUSTOM_KINDS]


@pytest.mark.parametrize(("ident", "obj"), CORE, ids=[i for i, _ in CORE])
def test_core_objects_match_kubernetes_schema(ident: str, obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _crd_schema(file: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / file).read_text())
    schema = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    return schema


#: The vendored upstream schema of every custom backend kind (tests/fixtures/crds/README.md says where from).
CRD_FILES = {
    "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
    "DeepSpeedJob": "batch.tensorstack.dev_deepspeedjobs.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
}


def test_every_custom_kind_is_rendered_and_has_a_vendored_schema() -> None:
    assert {o["kind"] for _, o in CUSTOM} == CUSTOM_KINDS == set(CRD_FILES)


@pytest.mark.parametrize(("ident", "obj"), CUSTOM, ids=[i for i, _ in CUSTOM])
def test_custom_workloads_match_upstream_crd(ident: str, obj: dict[str, Any]) -> None:
    crd = yaml.safe_load((CRDS / CRD_FILES[obj["kind"]]).read_text())
    assert obj["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert obj["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.Draft202012Validator(_crd_schema(CRD_FILES[obj["kind"]])).validate(obj)
    for rule in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].get("x-kubernetes-validations") or []:
        assert _cel(rule["rule"], obj), f"{rule['message']} ({ident})"
    for tpl in _pod_templates(obj):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl},
            K8S_VERSION,
            strict=True,
        )


def test_crd_schema_catches_a_misspelt_field() -> None:
    """The strict CRD schema is not vacuous: a typo in a rendered field fails."""
    (_, obj) = next((i, o) for i, o in CUSTOM if o["kind"] == "PyTorchJob")
    bad = copy.deepcopy(obj)
    bad["spec"]["runPolicy"]["suspnd"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_crd_schema(CRD_FILES["PyTorchJob"])).validate(bad)
    (_, ds) = next((i, o) for i, o in CUSTOM if o["kind"] == "DeepSpeedJob")
    bad = copy.deepcopy(ds)
    bad["spec"]["config"]["slotPerWorker"] = bad["spec"]["config"].pop("slotsPerWorker")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_crd_schema(CRD_FILES["DeepSpeedJob"])).validate(bad)
    (_, tj) = next((i, o) for i, o in CUSTOM if o["kind"] == "TrainJob")
    bad = copy.deepcopy(tj)
    bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"
    ]["template"]["spec"]["priorityClassName"] = "high"  # not patchable in Trainer v2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_crd_schema(CRD_FILES["TrainJob"])).validate(bad)


def _cel(expr: str, obj: dict[str, Any]) -> bool:
    """Evaluate one of a CRD's top-level CEL rules (``self`` is the object) with a real CEL interpreter."""
    env = celpy.Environment()
    program = env.program(env.compile(expr))
    return bool(program.evaluate({"self": celpy.json_to_cel(obj)}))


@pytest.mark.parametrize(("ident", "obj"), ALL_OBJECTS, ids=[i for i, _ in ALL_OBJECTS])
def test_metadata_conventions(ident: str, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    assert is_dns_label(meta["name"]), meta["name"]
    assert meta["namespace"]
    assert "ownerReferences" not in meta  # the operator adds them
    labels = meta["labels"]
    for key in (c.LABEL_NAME, c.LABEL_INSTANCE, c.LABEL_COMPONENT, c.LABEL_MANAGED_BY, c.LABEL_JOB, c.LABEL_STAGE):
        assert key in labels, key
    assert all(len(v) <= 63 for v in labels.values())
    for tpl in _pod_templates(obj):
        assert tpl["metadata"]["labels"][c.LABEL_JOB] == labels[c.LABEL_JOB]


# ------------------------------------------------------------------------------------------------------------
# Pods: volumes, security, service accounts, secrets
# ------------------------------------------------------------------------------------------------------------


def _mounts(tpl: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in tpl["spec"]["containers"][0]["volumeMounts"]}


def test_training_pods_mount_model_and_data_read_only() -> None:
    job = _example(CONTRACT)
    plan = render(job)
    for step in plan.steps:
        if step.kind != "train":
            continue
        for tpl in _pod_templates(step.workload):
            m = _mounts(tpl)
            assert m["/mnt/volumes/models"]["readOnly"] is True
            assert m["/mnt/volumes/data"]["readOnly"] is True
            assert m["/mnt/volumes/finetune-outputs"]["readOnly"] is False
            assert m["/etc/finetune"]["readOnly"] is True
            assert m["/dev/shm"]["name"] == "dshm"
            vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
            assert vols["dshm"]["emptyDir"] == {"medium": "Memory"}
    serve = plan.step("serve").workload
    assert all(m.get("readOnly") for p, m in _mounts(serve["spec"]["template"]).items() if p.startswith("/mnt"))
    download = plan.step("download").workload
    assert _mounts(download["spec"]["template"])["/mnt/volumes/models"]["readOnly"] is False


def test_shared_claim_is_mounted_once_and_writable() -> None:
    raw = _raw(EXAMPLES[0])
    raw["spec"]["output"]["volume"] = {"claimName": "models", "subPath": "outputs"}
    plan = render(validate(raw))
    tpl = plan.step("sft").workload["spec"]["template"]
    claims = [v for v in tpl["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == ["data", "models"]
    assert _mounts(tpl)["/mnt/volumes/models"]["readOnly"] is False


def test_download_token_only_as_secret_key_ref() -> None:
    job = _example(EXAMPLES[0])
    plan = render(job)
    text = render_yaml(job)
    env = plan.step("download").workload["spec"]["template"]["spec"]["containers"][0]["env"]
    token = [e for e in env if e["name"] == "HF_TOKEN"]
    assert token == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": False}}}
    ]
    # no other step gets it, and nothing carries a literal value for it
    for step in plan.steps:
        if step.name != "download":
            for tpl in _pod_templates(step.workload):
                assert all(e["name"] != "HF_TOKEN" for e in tpl["spec"]["containers"][0]["env"])
    assert "hf-token" not in json.dumps(plan.shared)
    assert text.count("secretKeyRef") == 1


def test_modelscope_token_env() -> None:
    raw = _raw(EXAMPLES[1])
    raw["spec"]["model"]["tokenSecretRef"] = {"name": "ms", "key": "k"}
    env = render(validate(raw)).step("download").workload["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "MODELSCOPE_API_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "ms", "key": "k", "optional": False}},
    } in env


def test_service_accounts_only_on_reporting_pods() -> None:
    for path in EXAMPLES:
        job = _example(path)
        plan = render(job)
        own = identity.worker_identity_name(job)
        for step in plan.steps:
            wl = step.workload
            if wl["kind"] == "PyTorchJob":
                replicas = wl["spec"]["pytorchReplicaSpecs"]
                assert replicas["Master"]["template"]["spec"]["serviceAccountName"] == own
                assert replicas["Master"]["template"]["spec"]["automountServiceAccountToken"] is True
                if "Worker" in replicas:
                    assert replicas["Worker"]["template"]["spec"]["automountServiceAccountToken"] is False
                    assert "serviceAccountName" not in replicas["Worker"]["template"]["spec"]
                continue
            for tpl in _pod_templates(wl):
                spec = tpl["spec"]
                if step.kind in ("train", "preflight"):  # the preflight pod reports status.plan
                    assert spec["serviceAccountName"] == own
                    assert spec["automountServiceAccountToken"] is True
                else:
                    assert spec["automountServiceAccountToken"] is False
                    assert "serviceAccountName" not in spec


def test_restricted_security_context_except_deepspeedjob() -> None:
    for _, obj in ALL_OBJECTS:
        for tpl in _pod_templates(obj):
            ctr = tpl["spec"]["containers"][0]["securityContext"]
            assert ctr["seccompProfile"] == {"type": "RuntimeDefault"}
            if obj["kind"] == "DeepSpeedJob":
                continue  # T9k's launcher needs sshd as root: documented in render.workloads
            assert ctr["allowPrivilegeEscalation"] is False
            assert ctr["capabilities"] == {"drop": ["ALL"]}
            assert ctr["runAsNonRoot"] is True
            assert ctr["readOnlyRootFilesystem"] is True
            assert tpl["spec"]["securityContext"]["runAsUser"] != 0
            mounts = _mounts(tpl)
            assert {"/tmp", "/dev/shm"} <= set(mounts)


def test_gpu_limits() -> None:
    plan = render(_example(CONTRACT))
    master = plan.step("sft").workload["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert master["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    merge = plan.step("merge").workload["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in merge.get("limits", {})  # exportDevice cpu
    serve = plan.step("serve").workload["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert serve["limits"]["nvidia.com/gpu"] == 1


def test_scheduling_and_kueue() -> None:
    plan = render(_example(CONTRACT))
    for step in plan.steps:
        wl = step.workload
        if step.kind == "serve":
            assert c.LABEL_KUEUE_QUEUE not in wl["metadata"]["labels"]
            continue
        assert wl["metadata"]["labels"][c.LABEL_KUEUE_QUEUE] == "team-a"
        path = suspend_path(wl["kind"])
        node: Any = wl
        for key in path:
            node = node[key]
        assert node is True, f"{step.name} must be created suspended for Kueue"
        for tpl in _pod_templates(wl):
            spec = tpl["spec"]
            # GPU placement only for pods that request GPUs (download, preflight and merge use none).
            gpu = step.kind not in ("download", "preflight", "merge")
            assert spec.get("nodeSelector") == ({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} if gpu else None)
            assert spec["priorityClassName"] == "training"
            assert spec["schedulerName"] == "volcano"
    run_policy = plan.step("sft").workload["spec"]["runPolicy"]
    assert run_policy["schedulingPolicy"]["minAvailable"] == 2


def test_not_suspended_without_queue() -> None:
    plan = render(_example(EXAMPLES[0]))
    assert plan.step("sft").workload["spec"]["suspend"] is False
    raw = _raw(EXAMPLES[0])
    raw["spec"]["suspend"] = True
    assert render(validate(raw)).step("sft").workload["spec"]["suspend"] is True


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("Job", ("spec", "suspend")),
        ("PyTorchJob", ("spec", "runPolicy", "suspend")),
        ("DeepSpeedJob", ("spec", "runMode", "pause", "enabled")),
    ],
)
def test_suspend_path(kind: str, path: tuple[str, ...]) -> None:
    assert suspend_path(kind) == path


def test_suspend_path_unknown_kind() -> None:
    with pytest.raises(KeyError):
        suspend_path("Deployment")


def test_deepspeedjob_suspend_and_launch() -> None:
    raw = _raw(EXAMPLES[3])
    raw["spec"]["suspend"] = True
    wl = render(validate(raw)).step("sft").workload
    assert wl["spec"]["runMode"] == {"pause": {"enabled": True}}
    assert wl["spec"]["config"]["slotsPerWorker"] == 4
    assert wl["spec"]["config"]["localRank"] is False
    assert wl["spec"]["config"]["run"] == {"exec": worker_command("train", "sft")}
    assert wl["spec"]["worker"]["replicas"] == 2
    assert wl["spec"]["worker"]["template"]["spec"]["containers"][0]["name"] == "worker"


# ------------------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------------------


def test_single_node_job_backend() -> None:
    plan = render(_example(EXAMPLES[0]))
    assert [s.name for s in plan.steps] == ["download", "preflight", "sft"]
    wl = plan.step("sft").workload
    assert wl["kind"] == "Job" and "completionMode" not in wl["spec"]
    assert wl["spec"]["template"]["spec"]["containers"][0]["command"] == worker_command("train", "sft")
    assert wl["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


def test_multi_node_job_backend_is_indexed_with_headless_service() -> None:
    raw = _raw(EXAMPLES[2])
    raw["spec"]["backend"] = "job"
    plan = render(validate(raw))
    step = plan.step("sft")
    svc, wl = step.objects
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert wl["spec"]["completionMode"] == "Indexed"
    assert wl["spec"]["completions"] == wl["spec"]["parallelism"] == 2
    pod = wl["spec"]["template"]
    assert pod["spec"]["subdomain"] == svc["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["FT_MASTER_ADDR"] == f"{wl['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["FT_NNODES"] == "2" and env["FT_NPROC_PER_NODE"] == "8"
    # the headless Service selects exactly the Job's pods
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    for obj in step.objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_pytorchjob_replicas() -> None:
    wl = render(_example(EXAMPLES[2])).step("sft").workload
    spec = wl["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["runPolicy"]["ttlSecondsAfterFinished"] > 0
    for r in spec["pytorchReplicaSpecs"].values():
        assert r["template"]["spec"]["containers"][0]["name"] == "pytorch"


def test_backoff_limit_option() -> None:
    plan = render(_example(EXAMPLES[0]), RenderOptions(backoff_limit=0))
    assert plan.step("sft").workload["spec"]["backoffLimit"] == 0


def test_images_and_options() -> None:
    job = _example(EXAMPLES[4])
    plan = render(job, RenderOptions(worker_image="w:1", vllm_image="v:1", worker_service_account="sa"))
    sft = plan.step("sft").workload["spec"]["template"]["spec"]
    assert sft["containers"][0]["image"] == "w:1" and sft["serviceAccountName"] == "sa"
    assert plan.step("serve").workload["spec"]["template"]["spec"]["containers"][0]["image"] == "v:1"


# ------------------------------------------------------------------------------------------------------------
# LLaMA-Factory configs and chaining
# ------------------------------------------------------------------------------------------------------------


def _files(path: Path, resolver: PathResolver | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config_files(_example(path), resolver).items():
        out[k] = json.loads(v) if k.endswith(".json") else yaml.safe_load(v)
    return out


def test_lora_after_lora_stacks_adapters() -> None:
    files = _files(CONTRACT)
    out = "/mnt/volumes/finetune-outputs/qwen2-support"
    assert "adapter_name_or_path" not in files["sft.yaml"]
    assert files["dpo.yaml"]["adapter_name_or_path"] == f"{out}/sft"
    assert files["dpo.yaml"]["create_new_adapter"] is True
    assert files["dpo.yaml"]["model_name_or_path"] == "/mnt/volumes/models/qwen2-7b-instruct"
    assert files["merge.yaml"]["adapter_name_or_path"] == f"{out}/sft,{out}/dpo"
    assert files["merge.yaml"]["export_dir"] == f"{out}/merged"
    assert files["sft.yaml"]["deepspeed"] == "/etc/finetune/ds_sft.json"
    assert files["ds_sft.json"]["zero_optimization"]["stage"] == 2


def test_full_stage_output_feeds_the_next_stage() -> None:
    raw = _raw(EXAMPLES[2])
    raw["spec"]["stages"].append(
        {"name": "dpo", "type": "dpo", "datasets": ["prefs"], "method": "lora", "resources": {"nodes": 1}}
    )
    raw["spec"]["datasets"].append(
        {
            "name": "prefs",
            "volume": {"claimName": "data", "subPath": "p.jsonl"},
            "ranking": True,
            "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
        }
    )
    job = validate(raw)
    files = {k: yaml.safe_load(v) for k, v in config_files(job).items() if k.endswith(".yaml")}
    out = "/mnt/volumes/shared-outputs/mistral-full-sft"
    assert files["dpo.yaml"]["model_name_or_path"] == f"{out}/sft"
    assert "adapter_name_or_path" not in files["dpo.yaml"]
    cmd = vllm_command(job)
    assert cmd.mode == "lora" and cmd.model == f"{out}/sft"
    assert cmd.lora_modules == (("mistral-domain", f"{out}/dpo"),)


def test_qlora_config_and_merge_unquantized() -> None:
    files = _files(EXAMPLES[1])
    assert files["sft.yaml"]["quantization_bit"] == 4
    assert files["sft.yaml"]["finetuning_type"] == "lora"
    assert files["sft.yaml"]["lora_target"] == "q_proj,k_proj,v_proj,o_proj"
    assert "quantization_bit" not in files["merge.yaml"]


def test_zero3_lora_continues_the_single_earlier_adapter() -> None:
    raw = _raw(CONTRACT)
    raw["spec"]["stages"][1]["deepspeed"] = {"zeroStage": 3}
    job = validate(raw)
    ch = lf.chain(job, PathResolver())
    out = "/mnt/volumes/finetune-outputs/qwen2-support"
    assert ch.stages["dpo"].adapters == (f"{out}/sft",)
    assert ch.stages["dpo"].create_new_adapter is False
    assert ch.adapters == (f"{out}/dpo",)  # continued adapter replaces the first: merge applies it once


def test_impossible_chains_raise_render_error() -> None:
    raw = _raw(CONTRACT)
    raw["spec"]["stages"][1]["method"] = "full"
    with pytest.raises(RenderError, match="full"):
        render(FineTuneJob.model_validate(raw))
    raw = _raw(CONTRACT)
    raw["spec"]["merge"]["enabled"] = False
    with pytest.raises(RenderError, match="stacked"):
        render(FineTuneJob.model_validate(raw))
    raw = _raw(CONTRACT)
    raw["spec"]["stages"][1]["name"] = "merge"
    with pytest.raises(RenderError, match="reserved"):
        render(FineTuneJob.model_validate(raw))


def test_dataset_info_format() -> None:
    info = _files(EXAMPLES[4])["dataset_info.json"]
    assert info == {
        "faq": {
            "file_name": "/mnt/volumes/data/faq/faq.jsonl",
            "formatting": "alpaca",
            "columns": {"prompt": "question", "query": "context", "response": "answer", "system": "persona"},
        }
    }
    info = _files(CONTRACT)["dataset_info.json"]
    assert info["support_prefs"]["ranking"] is True
    assert info["support_chat"]["tags"]["role_tag"] == "role"


def test_local_resolver_reuses_the_same_configs(tmp_path: Path) -> None:
    res = PathResolver(volume_root=str(tmp_path / "vol"), config_dir=str(tmp_path / "cfg"))
    files = _files(CONTRACT, res)
    assert files["sft.yaml"]["output_dir"] == f"{tmp_path}/vol/finetune-outputs/qwen2-support/sft"
    assert files["sft.yaml"]["dataset_dir"] == f"{tmp_path}/cfg"
    assert files["dataset_info.json"]["support_chat"]["file_name"] == f"{tmp_path}/vol/data/support/chat.jsonl"
    pod = _files(CONTRACT)
    strip = {"model_name_or_path", "adapter_name_or_path", "output_dir", "dataset_dir", "deepspeed"}
    assert {k: v for k, v in files["dpo.yaml"].items() if k not in strip} == {
        k: v for k, v in pod["dpo.yaml"].items() if k not in strip
    }


def test_floats_survive_pyyaml_and_omegaconf() -> None:
    text = to_yaml({"learning_rate": 1e-5, "b": 2.0e-4, "c": 5e-6})
    assert yaml.safe_load(text) == {"learning_rate": 1e-5, "b": 2.0e-4, "c": 5e-6}
    omegaconf = pytest.importorskip("omegaconf")
    loaded = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.create(text))
    assert loaded == {"learning_rate": 1e-5, "b": 2.0e-4, "c": 5e-6}


def test_owned_args_cannot_be_overridden() -> None:
    raw = _raw(EXAMPLES[0])
    raw["spec"]["stages"][0]["args"]["output_dir"] = "/somewhere/else"
    files = config_files(FineTuneJob.model_validate(raw))
    assert yaml.safe_load(files["sft.yaml"])["output_dir"].endswith("/llama3-lora-sft/sft")


# ------------------------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------------------------


def test_serve_merged_mode() -> None:
    job = _example(CONTRACT)
    cmd = vllm_command(job)
    assert cmd.mode == "merged"
    assert cmd.args[0] == "/mnt/volumes/finetune-outputs/qwen2-support/merged"
    assert cmd.args[cmd.args.index("--served-model-name") + 1] == "support-bot"
    assert cmd.args[cmd.args.index("--max-model-len") + 1] == "8192"
    assert "--enable-lora" not in cmd.args
    assert cmd.args[-1] == "--gpu-memory-utilization=0.90"
    plan = render(job)
    assert plan.outputs == {
        "adapters": [
            "/mnt/volumes/finetune-outputs/qwen2-support/sft",
            "/mnt/volumes/finetune-outputs/qwen2-support/dpo",
        ],
        "model": "/mnt/volumes/finetune-outputs/qwen2-support/merged",
        "mergedModel": "/mnt/volumes/finetune-outputs/qwen2-support/merged",
        "endpoint": "http://qwen2-support-serve.ml.svc:8000/v1",
        "servedModelName": "support-bot",
    }
    dep = plan.step("serve").workload
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    assert ctr["command"] == ["vllm", "serve"] and ctr["args"] == list(cmd.args)
    assert {e["name"]: e["value"] for e in ctr["env"]} == dict(cmd.env)
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = ctr["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # 70B models load slowly
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    svc = plan.step("serve").objects[1]
    assert svc["spec"]["ports"][0]["port"] == 8000
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_serve_lora_mode() -> None:
    job = _example(EXAMPLES[4])
    cmd = vllm_command(job)
    assert cmd.mode == "lora"
    assert cmd.args[0] == "/mnt/volumes/models/llama-3.2-3b-instruct"
    i = cmd.args.index("--lora-modules")
    assert cmd.args[i + 1] == "faq-bot=/mnt/volumes/finetune-outputs/faq-bot/sft"
    assert "--enable-lora" in cmd.args
    assert cmd.args[cmd.args.index("--max-lora-rank") + 1] == "16"
    assert cmd.args[cmd.args.index("--served-model-name") + 1] == "faq-bot-base"
    assert cmd.served_model_name == "faq-bot"
    assert ("VLLM_LOGGING_LEVEL", "INFO") in cmd.env
    dep = render(job).step("serve").workload
    mounts = _mounts(dep["spec"]["template"])
    assert mounts["/mnt/volumes/models"]["readOnly"] and mounts["/mnt/volumes/finetune-outputs"]["readOnly"]


@pytest.mark.parametrize(("rank", "expected"), [(4, 8), (8, 8), (33, 64), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_vllm_value(rank: int, expected: int) -> None:
    raw = _raw(EXAMPLES[4])
    raw["spec"]["stages"][0]["lora"]["rank"] = rank
    cmd = vllm_command(validate(raw))
    assert cmd.args[cmd.args.index("--max-lora-rank") + 1] == str(expected)


def test_serve_full_mode() -> None:
    cmd = vllm_command(_example(EXAMPLES[2]))
    assert cmd.mode == "full"
    assert cmd.args[0] == "/mnt/volumes/shared-outputs/mistral-full-sft/sft"
    assert cmd.args[cmd.args.index("--tensor-parallel-size") + 1] == "2"


def test_serve_command_with_local_resolver(tmp_path: Path) -> None:
    res = PathResolver(claims={"models": str(tmp_path / "m"), "finetune-outputs": str(tmp_path / "o")})
    cmd = vllm_command(_example(EXAMPLES[4]), res, host="127.0.0.1", port=8123)
    assert cmd.args[0] == f"{tmp_path}/m/llama-3.2-3b-instruct"
    assert cmd.args[cmd.args.index("--port") + 1] == "8123"
    assert cmd.lora_modules == (("faq-bot", f"{tmp_path}/o/faq-bot/sft"),)


def test_rollout_hash_ignores_replicas() -> None:
    raw = _raw(CONTRACT)
    base = render(validate(raw)).step("serve").workload["spec"]["template"]["metadata"]["annotations"]
    raw["spec"]["serve"]["replicas"] = 3
    scaled = render(validate(raw)).step("serve").workload["spec"]["template"]["metadata"]["annotations"]
    assert base == scaled
    raw["spec"]["stages"][0]["args"]["learning_rate"] = 2.0e-4
    changed = render(validate(raw)).step("serve").workload["spec"]["template"]["metadata"]["annotations"]
    assert changed != base


# ------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON shapes (the real DeepSpeed check is in test_render_deepspeed.py)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload(stage: int) -> None:
    cfg = deepspeed_config(DeepSpeedSpec(zero_stage=stage, offload=True))["zero_optimization"]
    assert cfg["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in cfg) == (stage == 3)


def test_offload_with_zero0_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="offload"):
        deepspeed_config(DeepSpeedSpec(zero_stage=0, offload=True))


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def _ftctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from finetune_operator.cli import main; sys.exit(main(sys.argv[1:]))",
            *args,
        ],
        capture_output=True,
        text=True,
        input=stdin,
    )


def test_cli_render_stdout_matches_golden() -> None:
    res = _ftctl("render", "-f", str(CONTRACT))
    assert res.returncode == 0, res.stderr
    assert res.stdout == (GOLDEN / f"{CONTRACT.stem}.yaml").read_text()


def test_cli_render_to_dir(tmp_path: Path) -> None:
    res = _ftctl("render", "-f", str(CONTRACT), "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00-shared.yaml",
        "01-download.yaml",
        "02-preflight.yaml",
        "03-sft.yaml",
        "04-dpo.yaml",
        "05-merge.yaml",
        "06-serve.yaml",
    ]
    joined = "".join((tmp_path / n).read_text() for n in names)
    assert joined == (GOLDEN / f"{CONTRACT.stem}.yaml").read_text()


def test_cli_render_invalid_spec(tmp_path: Path) -> None:
    raw = _raw(EXAMPLES[0])
    raw["spec"]["stages"][0]["datasets"] = ["nope"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = _ftctl("render", "-f", str(bad))
    assert res.returncode == 1
    assert "spec.stages[0].datasets[0]" in res.stderr
    assert res.stdout == ""
    assert "Traceback" not in res.stderr


def test_cli_render_usage_errors(tmp_path: Path) -> None:
    assert _ftctl("render").returncode == 2
    res = _ftctl("render", "-f", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_cli_render_stdin() -> None:
    res = _ftctl("render", "-f", "-", stdin=EXAMPLES[0].read_text())
    assert res.returncode == 0, res.stderr
    assert res.stdout == (GOLDEN / f"{EXAMPLES[0].stem}.yaml").read_text()


# ------------------------------------------------------------------------------------------------------------
# Names and edge cases
# ------------------------------------------------------------------------------------------------------------


def test_long_names_stay_valid() -> None:
    raw = _raw(CONTRACT)
    raw["metadata"]["name"] = "a" * 63
    raw["spec"]["stages"][0]["name"] = "s" * 40
    raw["spec"]["backend"] = "job"  # Indexed Job: pod hostnames are <job>-<index>
    raw["spec"]["output"]["volume"]["claimName"] = "outputs.team-a.example.com"
    plan = render(validate(raw))
    for obj in plan.objects():
        assert is_dns_label(obj["metadata"]["name"]), obj["metadata"]["name"]
        if obj["apiVersion"] in ("v1", "batch/v1", "apps/v1"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        for tpl in _pod_templates(obj):
            assert all(is_dns_label(v["name"]) for v in tpl["spec"]["volumes"])
    wl = plan.step("s" * 40).workload
    assert len(f"{wl['metadata']['name']}-15") <= 63  # a 16-node Indexed Job's last hostname still fits
    assert plan.outputs["endpoint"].startswith("http://")
    # names stay distinct after truncation
    names = [(o["kind"], o["metadata"]["name"]) for o in plan.objects()]
    assert len(names) == len(set(names))


def test_kto_dataset_info() -> None:
    raw = _raw(EXAMPLES[0])
    raw["spec"]["datasets"][0]["columns"] = {"prompt": "instruction", "response": "output", "ktoTag": "label"}
    raw["spec"]["stages"][0]["type"] = "kto"
    info = json.loads(config_files(validate(raw))["dataset_info.json"])
    assert info["support_tickets"]["columns"]["kto_tag"] == "label"


def test_deepspeedjob_runs_as_root_with_roots_home() -> None:
    """T9k's launcher model needs root (sshd, /root/.ssh) and DeepSpeed's runner reads ~/.deepspeed_env (written
    by T9k): the worker image's user (65532) and HOME (/tmp) would break both, so the pods say root and /root.
    Found by running the pods in the image (tests/test_e2e.py): as 65532, sshd could not read its host key."""
    wl = render(_example(EXAMPLES[3])).step("sft").workload
    tpl = wl["spec"]["worker"]["template"]
    env = {e["name"]: e.get("value") for e in tpl["spec"]["containers"][0]["env"]}
    assert env["HOME"] == "/root"
    assert tpl["spec"]["securityContext"]["runAsUser"] == 0 and tpl["spec"]["securityContext"]["runAsGroup"] == 0
    job_env = render(_example(EXAMPLES[0])).step("sft").workload["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HOME", "value": "/tmp"} in job_env


def test_cli_render_several_jobs_into_subfolders(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text(EXAMPLES[0].read_text() + "\n---\n" + EXAMPLES[4].read_text())
    out = tmp_path / "out"
    res = _ftctl("render", "-f", str(both), "-o", str(out), "--worker-image", "reg/w:2")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["faq-bot", "llama3-lora-sft"]
    assert sorted(p.name for p in (out / "faq-bot").iterdir()) == [
        "00-shared.yaml",
        "01-preflight.yaml",
        "02-sft.yaml",
        "03-serve.yaml",
    ]
    assert "image: reg/w:2" in (out / "llama3-lora-sft" / "03-sft.yaml").read_text()
    stdout = _ftctl("render", "-f", str(both))
    assert stdout.returncode == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(stdout.stdout)]
    assert kinds.count("ConfigMap") == 2


@pytest.mark.parametrize(
    ("target", "expected"),
    [("all", "all"), ("q_proj,v_proj", "q_proj,v_proj"), (["q_proj", "v_proj"], "q_proj,v_proj")],
)
def test_lora_target_forms(target: Any, expected: str) -> None:
    raw = _raw(EXAMPLES[0])
    raw["spec"]["stages"][0]["lora"]["target"] = target
    assert yaml.safe_load(config_files(FineTuneJob.model_validate(raw))["sft.yaml"])["lora_target"] == expected


def test_scheduler_specific_policies() -> None:
    raw = _raw(EXAMPLES[3])
    raw["spec"]["scheduling"] = {"schedulerName": "t9k-scheduler", "queueName": "a100"}
    wl = render(validate(raw)).step("sft").workload
    assert wl["spec"]["scheduler"] == {"t9kScheduler": {"queue": "a100"}}
    assert c.LABEL_KUEUE_QUEUE not in wl["metadata"]["labels"]  # Kueue has no DeepSpeedJob integration
    assert "runMode" not in wl["spec"]  # not suspended: T9k's own queue admits it
    raw = _raw(EXAMPLES[2])
    raw["spec"]["scheduling"].pop("schedulerName")
    run_policy = render(validate(raw)).step("sft").workload["spec"]["runPolicy"]
    assert "schedulingPolicy" not in run_policy  # gang policy only for Volcano


def test_reserved_stage_names_agree_with_validation() -> None:
    from finetune_operator import render as render_pkg
    from finetune_operator import validation

    assert render_pkg.RESERVED_STAGE_NAMES == validation.RESERVED_STAGE_NAMES


@pytest.mark.parametrize(
    ("formatting", "columns", "tags", "expected_columns", "expected_tags"),
    [
        # A partial alpaca block keeps LLaMA-Factory's defaults for the columns it omits.
        (
            "alpaca",
            {"system": "persona"},
            None,
            {"prompt": "instruction", "query": "input", "response": "output", "system": "persona"},
            None,
        ),
        # A partial sharegpt block: messages default, and every omitted tag takes LF's default.
        (
            "sharegpt",
            {"system": "sys"},
            {"roleTag": "role"},
            {"messages": "conversations", "system": "sys"},
            {
                "role_tag": "role",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
                "observation_tag": "observation",
                "function_tag": "function_call",
                "system_tag": "system",
            },
        ),
        # Nothing given: nothing written, LF applies its defaults itself.
        ("sharegpt", None, None, None, None),
    ],
)
def test_partial_columns_and_tags_keep_llamafactory_defaults(
    formatting: str,
    columns: dict[str, str] | None,
    tags: dict[str, str] | None,
    expected_columns: dict[str, str] | None,
    expected_tags: dict[str, str] | None,
) -> None:
    """LF sets every column a ``columns`` block omits to None; the API promises its defaults instead."""
    raw = _raw(EXAMPLES[0])
    ds = raw["spec"]["datasets"][0]
    ds["formatting"] = formatting
    ds.pop("columns", None)
    ds.pop("tags", None)
    if columns is not None:
        ds["columns"] = columns
    if tags is not None:
        ds["tags"] = tags
    entry = json.loads(config_files(validate(raw))["dataset_info.json"])[ds["name"]]
    assert entry.get("columns") == expected_columns
    assert entry.get("tags") == expected_tags


# ------------------------------------------------------------------------------------------------ re-runs


def _with_run(path: Path, run_id: str | None) -> FineTuneJob:
    doc = _raw(path)
    if run_id is not None:
        doc["spec"]["runId"] = run_id
    return validate(doc)


def _run_scoped_names(plan: Any) -> list[str]:
    """Names of a run's children: not the serve step's (kept across runs), not the job's worker identity."""
    return [
        o["metadata"]["name"]
        for o in plan.objects()
        if o["metadata"]["labels"][c.LABEL_STAGE] != "serve"
        and o["metadata"]["labels"][c.LABEL_COMPONENT] != identity.COMPONENT_IDENTITY
    ]


@pytest.mark.parametrize("path", [EXAMPLES[3], CONTRACT], ids=["deepspeedjob", "pytorchjob"])
def test_run_id_versions_outputs_and_run_scoped_names(path: Path) -> None:
    plain, run1, run2 = render(_with_run(path, None)), render(_with_run(path, "r1")), render(_with_run(path, "r2"))
    job = _with_run(path, "r1")
    base = f"/mnt/volumes/{job.spec.output.volume.claim_name}"
    if job.spec.output.volume.sub_path:
        base += f"/{job.spec.output.volume.sub_path}"
    base += f"/{job.name}"
    # Per-run folders: every training stage and the merged model, in the LF configs and the outputs.
    for step in run1.steps:
        if step.kind in ("train", "merge"):
            leaf = "merged" if step.kind == "merge" else step.name
            assert step.output_path == f"{base}/r1/{leaf}"
            assert plain.step(step.name).output_path == f"{base}/{leaf}"
    assert run1.outputs["mergedModel"] == f"{base}/r1/merged"
    assert all(a.startswith(f"{base}/r1/") for a in run1.outputs["adapters"])
    configs = run1.shared[0]["data"]
    assert f"{base}/r1/" in configs["merge.yaml"] and f"{base}/r2/" not in configs["merge.yaml"]
    # Run-scoped children never share a name with another run's (or the run-less job's) children.
    names1, names2, names0 = _run_scoped_names(run1), _run_scoped_names(run2), _run_scoped_names(plain)
    assert not set(names1) & set(names2) and not set(names1) & set(names0)
    assert all(is_dns_label(n) for n in names1)
    assert run1.shared[0]["metadata"]["name"] == f"{job.name}-r1-config"
    for tpl in (t for step in run1.steps if step.kind != "serve" for t in _pod_templates(step.workload)):
        cm = [v["configMap"]["name"] for v in tpl["spec"]["volumes"] if "configMap" in v]
        assert cm == [f"{job.name}-r1-config"]
    # The serving Deployment and Service keep their names across runs, so the endpoint does not move ...
    dep1, dep2 = run1.step("serve").workload, run2.step("serve").workload
    assert dep1["metadata"]["name"] == dep2["metadata"]["name"] == plain.step("serve").workload["metadata"]["name"]
    assert run1.outputs["endpoint"] == run2.outputs["endpoint"] == plain.outputs["endpoint"]
    assert run1.step("serve").objects[1] == run2.step("serve").objects[1]
    # ... the selector too (immutable in a Deployment), while the pod template changes: it rolls.
    assert dep1["spec"]["selector"] == dep2["spec"]["selector"]
    assert dep1["spec"]["template"] != dep2["spec"]["template"]
    args1 = dep1["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args1[0] == f"{base}/r1/merged"
    assert dep1["metadata"]["annotations"] == {c.ANNOTATION_RUN: "r1"}
    assert "annotations" not in plain.step("serve").workload["metadata"]
    # Old pods keep serving until new ones are ready.
    assert dep1["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_run_id_lora_mode_serves_the_runs_adapter() -> None:
    job = _with_run(EXAMPLES[4], "v2")
    cmd = vllm_command(job)
    assert cmd.mode == "lora"
    assert cmd.args[0] == "/mnt/volumes/models/llama-3.2-3b-instruct"  # the base model is not per run
    assert cmd.lora_modules == (("faq-bot", "/mnt/volumes/finetune-outputs/faq-bot/v2/sft"),)


def test_long_run_scoped_names_stay_dns_labels() -> None:
    doc = _raw(CONTRACT)
    doc["metadata"]["name"] = "a" * 40
    doc["spec"]["runId"] = "b" * 20
    plan = render(validate(doc))
    names = _run_scoped_names(plan)
    assert len(set(names)) == len(names) and all(is_dns_label(n) for n in names)


def test_each_job_gets_a_worker_identity_limited_to_its_own_status() -> None:
    """The reporting pod's ServiceAccount may patch this FineTuneJob's status and nothing else."""
    job = _example(CONTRACT)
    plan = render(job)
    name = identity.worker_identity_name(job)
    kinds = {o["kind"]: o for o in plan.shared if o["metadata"]["name"] == name}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding"}
    assert kinds["ServiceAccount"]["automountServiceAccountToken"] is False
    assert kinds["Role"]["rules"] == [
        {"apiGroups": [c.GROUP], "resources": [f"{c.PLURAL}/status"], "resourceNames": [job.name], "verbs": ["patch"]}
    ]
    assert kinds["RoleBinding"]["roleRef"]["name"] == name
    assert kinds["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace}]
    # An install with a shared worker ServiceAccount gets no per-job objects.
    shared = render(job, RenderOptions(worker_service_account="sa"))
    assert [o["kind"] for o in shared.shared] == ["ConfigMap"]
