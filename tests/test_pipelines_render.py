"""Issue 16 in the renderer and validation: checkpoint settings (and, as they land, the stage graph, per-step
scheduling, trackers and multimodal data). Real validators; objects are checked where the API server checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.errors import SpecError
from finetune_operator.render import render
from finetune_operator.validation import load_documents, validate
from tests.test_validation import base, put

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"


def example(prefix: str) -> dict[str, Any]:
    (path,) = EXAMPLES.glob(f"{prefix}-*.yaml")
    (doc,) = load_documents(path)
    return doc


def pods(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod specs by the child workload's name (Jobs only: the examples here use the job backend)."""
    out = {}
    for obj in render(validate(doc)).objects():
        if obj["kind"] == "Job":
            out[obj["metadata"]["name"]] = obj["spec"]["template"]["spec"]
    return out


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["containers"][0]["env"]}


def errors(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        validate(doc)
    return {e.path: e.message for e in info.value.errors}


# ------------------------------------------------------------------------------------------------------------
# checkpoint: on preemption, on a clock, the grace period
# ------------------------------------------------------------------------------------------------------------


def test_checkpoint_example_renders_grace_and_interval_into_training_pods_only() -> None:
    rendered = pods(example("20"))
    train = [p for name, p in rendered.items() if name.endswith("-sft")]
    assert len(train) == 1
    assert train[0]["terminationGracePeriodSeconds"] == 300
    env = env_of(train[0])
    assert env["FT_CHECKPOINT_EVERY_SECONDS"] == "1200"
    assert env["FT_TERMINATION_GRACE_SECONDS"] == "300"
    assert "FT_PREEMPTION_CHECKPOINT" not in env  # on by default: nothing to say


def test_without_checkpoint_block_nothing_is_rendered() -> None:
    for pod in pods(base()).values():
        assert pod["terminationGracePeriodSeconds"] == 60
        assert not {"FT_CHECKPOINT_EVERY_SECONDS", "FT_TERMINATION_GRACE_SECONDS"} & set(env_of(pod))


def test_preemption_checkpoint_can_be_turned_off() -> None:
    doc = base()
    put("spec.stages[0].checkpoint", {"onPreemption": False})(doc)
    (sft,) = [p for n, p in pods(doc).items() if n.endswith("-sft")]
    assert env_of(sft)["FT_PREEMPTION_CHECKPOINT"] == "0"


@pytest.mark.parametrize(
    ("block", "field", "word"),
    [
        ({"every": "0s"}, "every", "longer than zero"),
        ({"every": "30 minutes"}, "every", "must match"),
        ({"every": "1d"}, "every", "must match"),
        ({"terminationGracePeriodSeconds": 5}, "terminationGracePeriodSeconds", "30"),
        ({"onPreemtion": True}, "onPreemtion", "did you mean"),
    ],
)
def test_bad_checkpoint_blocks_name_the_field(block: dict[str, Any], field: str, word: str) -> None:
    doc = copy.deepcopy(base())
    put("spec.stages[0].checkpoint", block)(doc)
    found = errors(doc)
    path = f"spec.stages[0].checkpoint.{field}"
    assert path in found, found
    assert word in found[path], found[path]


# ------------------------------------------------------------------------------------------------------------
# the stage graph: startFrom, rm never chained or merged unless named, ppo's reward model and reference
# ------------------------------------------------------------------------------------------------------------


def configs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    import yaml

    from finetune_operator.render import config_files

    return {k: yaml.safe_load(v) for k, v in config_files(validate(doc)).items() if k.endswith(".yaml")}


def graph_job(*stages: dict[str, Any], merge: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = base()
    doc["spec"]["datasets"].append(
        {
            "name": "prompts",
            "volume": {"claimName": "data", "subPath": "p.jsonl"},
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
        }
    )
    doc["spec"]["stages"] = list(stages)
    doc["spec"]["merge"] = merge or {"enabled": True}
    return doc


SFT = {"name": "sft", "type": "sft", "datasets": ["chat"]}
RM = {"name": "rm", "type": "rm", "datasets": ["prefs"]}
ORPO = {"name": "orpo", "type": "dpo", "datasets": ["prefs"], "args": {"pref_loss": "orpo"}}
PPO = {"name": "ppo", "type": "ppo", "datasets": ["prompts"], "rewardModel": {"stage": "rm"}}
OUT = "/mnt/volumes/outputs/demo"


def test_rm_is_not_stacked_into_later_stages_nor_merged() -> None:
    """The bug of issue 16: an ORPO stage after SFT and RM got adapter_name_or_path …/sft,…/rm."""
    cfg = configs(graph_job(SFT, RM, ORPO))
    assert cfg["rm.yaml"]["adapter_name_or_path"] == f"{OUT}/sft"  # rm starts from sft
    assert cfg["orpo.yaml"]["adapter_name_or_path"] == f"{OUT}/sft"
    assert cfg["merge.yaml"]["adapter_name_or_path"] == f"{OUT}/sft,{OUT}/orpo"


def test_rm_is_merged_and_chained_when_asked() -> None:
    cfg = configs(graph_job(SFT, RM, {**ORPO, "startFrom": "rm"}, merge={"enabled": True, "stage": "rm"}))
    assert cfg["orpo.yaml"]["adapter_name_or_path"] == f"{OUT}/sft,{OUT}/rm"
    assert cfg["merge.yaml"]["adapter_name_or_path"] == f"{OUT}/sft,{OUT}/rm"


def test_start_from_base_makes_a_branch() -> None:
    second = {"name": "sft2", "type": "sft", "datasets": ["chat"], "startFrom": "base"}
    cfg = configs(graph_job(SFT, second, merge={"enabled": True, "stage": "sft"}))
    assert "adapter_name_or_path" not in cfg["sft2.yaml"]
    assert cfg["merge.yaml"]["adapter_name_or_path"] == f"{OUT}/sft"


def test_ppo_with_a_lora_reward_model_of_the_same_start() -> None:
    cfg = configs(graph_job(SFT, RM, PPO))["ppo.yaml"]
    assert cfg["stage"] == "ppo"
    assert cfg["adapter_name_or_path"] == f"{OUT}/sft" and cfg["create_new_adapter"] is True
    assert (cfg["reward_model"], cfg["reward_model_type"]) == (f"{OUT}/rm", "lora")
    assert "ref_model" not in cfg  # LLaMA-Factory's default: the policy with its adapter disabled


def test_ppo_with_a_reward_model_of_another_start_loads_it_whole() -> None:
    rm = {**RM, "startFrom": "base"}
    cfg = configs(graph_job(SFT, rm, PPO))["ppo.yaml"]
    assert (cfg["reward_model"], cfg["reward_model_type"]) == ("/mnt/volumes/models/qwen2", "full")
    assert cfg["reward_model_adapters"] == f"{OUT}/rm"


def test_ppo_with_a_volume_reward_model_and_a_stage_reference() -> None:
    ppo = {**PPO, "rewardModel": {"volume": {"claimName": "models", "subPath": "rm-7b"}}, "reference": {"stage": "sft"}}
    cfg = configs(graph_job(SFT, ppo))["ppo.yaml"]
    assert (cfg["reward_model"], cfg["reward_model_type"]) == ("/mnt/volumes/models/rm-7b", "full")
    assert (cfg["ref_model"], cfg["ref_model_adapters"]) == ("/mnt/volumes/models/qwen2", f"{OUT}/sft")


def test_graph_example_renders_and_merges_without_rm() -> None:
    cfg = configs(example("21"))
    assert cfg["ppo.yaml"]["reward_model_type"] == "lora"
    assert "/rm" not in cfg["merge.yaml"]["adapter_name_or_path"]


@pytest.mark.parametrize(
    ("stages", "merge", "path", "word"),
    [
        ([{**SFT, "startFrom": "sft"}], None, "spec.stages[0].startFrom", "cycle"),
        ([{**SFT, "startFrom": "dpo"}, {**ORPO, "name": "dpo"}], None, "spec.stages[0].startFrom", "runs after"),
        ([SFT, {**ORPO, "startFrom": "sfft"}], None, "spec.stages[1].startFrom", "not a stage"),
        ([{**SFT, "name": "base"}, {**ORPO, "startFrom": "base"}], None, "spec.stages[1].startFrom", "ambiguous"),
        ([SFT, {**PPO, "rewardModel": None}], None, "spec.stages[1].rewardModel", "needs a reward model"),
        ([SFT, RM, {**PPO, "rewardModel": {"stage": "sft"}}], None, "spec.stages[2].rewardModel.stage", "not an rm"),
        ([SFT, {**PPO, "rewardModel": {"stage": "rm"}}, RM], None, "spec.stages[1].rewardModel.stage", "runs after"),
        (
            [SFT, RM, {**PPO, "rewardModel": {"stage": "rm", "volume": {"claimName": "m"}}}],
            None,
            "spec.stages[2].rewardModel",
            "exactly one",
        ),
        (
            [SFT, RM, {**SFT, "name": "sft2", "rewardModel": {"stage": "rm"}}],
            None,
            "spec.stages[2].rewardModel",
            "ppo stages only",
        ),
        ([SFT, {**ORPO, "reference": {"stage": "sft"}}], None, "spec.stages[1].reference", "reference-free"),
        (
            [SFT, {**SFT, "name": "sft2", "reference": {"stage": "sft"}}],
            None,
            "spec.stages[1].reference",
            "ppo and dpo and kto",
        ),
        ([SFT, RM, {**PPO, "args": {"val_size": 0.1}}], None, "spec.stages[2].args.val_size", "evaluation"),
        ([SFT, RM, {**PPO, "datasets": ["prefs"]}], None, "spec.stages[2].datasets[0]", "ranking"),
        ([SFT, RM], {"enabled": True, "stage": "rmm"}, "spec.merge.stage", "did you mean 'rm'"),
        (
            [SFT, {**SFT, "name": "full", "method": "full", "startFrom": "sft"}],
            None,
            "spec.stages[1].method",
            "cannot start from the LoRA adapters",
        ),
    ],
    ids=[
        "self-cycle",
        "forward",
        "unknown",
        "ambiguous-base",
        "ppo-no-rm",
        "rm-not-rm",
        "rm-later",
        "rm-both",
        "rm-on-sft",
        "orpo-reference",
        "reference-on-sft",
        "ppo-eval",
        "ppo-ranking",
        "merge-stage",
        "full-after-lora",
    ],
)
def test_bad_graphs_name_the_field(
    stages: list[dict[str, Any]], merge: dict[str, Any] | None, path: str, word: str
) -> None:
    doc = graph_job(*[{k: v for k, v in s.items() if v is not None} for s in stages], merge=merge)
    found = errors(doc)
    assert path in found, found
    assert word in found[path], found[path]


# ------------------------------------------------------------------------------------------------------------
# per-step scheduling
# ------------------------------------------------------------------------------------------------------------


def pod_specs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for obj in render(validate(doc)).objects():
        if obj["kind"] in ("Job", "Deployment"):
            out[obj["metadata"]["name"].rsplit("-", 1)[-1]] = obj["spec"]["template"]["spec"]
    return out


def test_per_step_scheduling_example() -> None:
    specs = pod_specs(example("22"))
    # download and merge: no GPU label, no GPU toleration; their own selectors over the job's other labels.
    assert specs["download"]["nodeSelector"] == {"kubernetes.io/arch": "amd64", "network.example.com/egress": "fast"}
    assert specs["merge"]["nodeSelector"] == {"kubernetes.io/arch": "amd64", "node.example.com/pool": "highmem"}
    assert "tolerations" not in specs["download"] and "tolerations" not in specs["merge"]
    assert specs["download"]["priorityClassName"] == "batch"
    # training: the job's GPU placement, plus its own affinity and priority class.
    sft = specs["sft"]
    assert sft["nodeSelector"] == {"nvidia.com/gpu.present": "true", "kubernetes.io/arch": "amd64"}
    assert sft["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert sft["priorityClassName"] == "training-high"
    terms = sft["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"]
    assert sft["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 50
    serve = specs["serve"]
    assert serve["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert serve["priorityClassName"] == "serving"


def test_cpu_training_stage_does_not_inherit_gpu_placement() -> None:
    doc = base()
    doc["spec"]["scheduling"] = {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "ml"}}
    doc["spec"]["stages"][0]["resources"]["gpusPerNode"] = 0
    specs = pod_specs(doc)
    assert specs["sft"]["nodeSelector"] == {"pool": "ml"}
    assert specs["dpo"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "ml"}


@pytest.mark.parametrize(
    ("where", "block", "path", "word"),
    [
        (
            "spec.stages[0].scheduling",
            {"nodeSelector": {"bad key!": "x"}},
            'spec.stages[0].scheduling.nodeSelector["bad key!"]',
            "invalid label key",
        ),
        (
            "spec.merge.scheduling",
            {"priorityClassName": "Not_Valid"},
            "spec.merge.scheduling.priorityClassName",
            "DNS-1123",
        ),
        (
            "spec.serve.scheduling",
            {"tolerations": [{"operator": "Exists", "value": "x"}]},
            "spec.serve.scheduling.tolerations[0].value",
            "must be empty",
        ),
        (
            "spec.model.downloadScheduling",
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In"}]}]
                        }
                    }
                }
            },
            "spec.model.downloadScheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms[0].matchExpressions[0].values",
            "must not be empty",
        ),
        (
            "spec.scheduling",
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 1,
                                "preference": {"matchExpressions": [{"key": "n", "operator": "Gt", "values": ["a"]}]},
                            }
                        ]
                    }
                }
            },
            "spec.scheduling.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference"
            ".matchExpressions[0].values",
            "single integer",
        ),
        ("spec.stages[0].scheduling", {"nodeSelectr": {}}, "spec.stages[0].scheduling.nodeSelectr", "did you mean"),
    ],
)
def test_bad_scheduling_names_the_field(where: str, block: dict[str, Any], path: str, word: str) -> None:
    doc = base()
    doc["spec"]["serve"] = {"enabled": True}
    put(where, block)(doc)
    found = errors(doc)
    assert path in found, found
    assert word in found[path], found[path]


# ------------------------------------------------------------------------------------------------------------
# experiment trackers
# ------------------------------------------------------------------------------------------------------------


def test_tracking_example_renders_report_to_and_credentials_by_reference() -> None:
    doc = example("23")
    cfg = configs(doc)
    sft = cfg["sft.yaml"]
    assert sft["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert sft["run_name"] == "qwen2-tracked-sft"
    assert "logging_dir" not in sft  # transformers 5 writes <output_dir>/runs/ (with the outputs)
    for obj in render(validate(doc)).objects():
        if obj["kind"] != "Job":
            continue
        env = obj["spec"]["template"]["spec"]["containers"][0]["env"]
        names = {e["name"]: e for e in env}
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "train":
            assert names["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
            assert names["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow", "key": "token"}}
            assert names["WANDB_PROJECT"]["value"] == "qwen2-finetunes"
            assert names["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.com"
        else:
            assert not any(n.startswith(("WANDB_", "MLFLOW_")) for n in names), component


@pytest.mark.parametrize(
    ("change", "path", "word"),
    [
        (put("spec.stages[0].args.report_to", "wandb"), "spec.stages[0].args.report_to", "spec.tracking"),
        (
            put("spec.stages[0].args.report_to", ["tensorboard", "mlflow"]),
            "spec.stages[0].args.report_to",
            "credentials",
        ),
        (put("spec.tracking", {"tensorboard": {}}), None, None),
        (
            lambda d: (put("spec.tracking", {"tensorboard": {}})(d), put("spec.stages[0].args.report_to", "none")(d)),
            "spec.stages[0].args.report_to",
            "set by spec.tracking",
        ),
        (
            put("spec.tracking", {"wandb": {"project": "p", "apiKeySecretRef": {"name": "Bad_Name", "key": "k"}}}),
            "spec.tracking.wandb.apiKeySecretRef.name",
            "Secret name",
        ),
        (put("spec.tracking", {"wandb": {"project": "p"}}), "spec.tracking.wandb.apiKeySecretRef", "required"),
        (
            put(
                "spec.tracking",
                {"mlflow": {"trackingUri": "https://m", "usernameSecretRef": {"name": "a", "key": "u"}}},
            ),
            "spec.tracking.mlflow",
            "both",
        ),
        (
            put("spec.tracking", {"mlflow": {"trackingUri": "ftp://m"}}),
            "spec.tracking.mlflow.trackingUri",
            "must match",
        ),
    ],
    ids=[
        "wandb-in-args",
        "mlflow-in-args",
        "tensorboard-ok",
        "report-to-owned",
        "bad-secret-name",
        "no-api-key",
        "half-basic-auth",
        "bad-uri",
    ],
)
def test_bad_tracking_names_the_field(change: Any, path: str | None, word: str | None) -> None:
    doc = base()
    change(doc)
    if path is None:
        validate(doc)
        return
    found = errors(doc)
    assert path in found, found
    assert word in found[path], found[path]


# ------------------------------------------------------------------------------------------------------------
# multimodal datasets (LLaMA-Factory's own parser reads the rendered dataset_info.json in test_render_lf)
# ------------------------------------------------------------------------------------------------------------


def test_multimodal_example_renders_columns_media_dir_and_a_read_only_media_mount() -> None:
    import json

    from finetune_operator.render import config_files

    doc = example("24")
    files = config_files(validate(doc))
    info = json.loads(files["dataset_info.json"])["captions"]
    assert info["columns"] == {"messages": "messages", "images": "images"}
    assert configs(doc)["sft.yaml"]["media_dir"] == "/mnt/volumes/data/vision/media"
    (sft,) = [p for n, p in pods(doc).items() if n.endswith("-sft")]
    mounts = {m["mountPath"]: m for m in sft["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/volumes/data"]["readOnly"] is True


def test_volume_reward_model_is_mounted_read_only() -> None:
    ppo = {**PPO, "rewardModel": {"volume": {"claimName": "rewards", "subPath": "rm-7b"}}}
    (pod,) = [p for n, p in pods(graph_job(SFT, ppo)).items() if n.endswith("-ppo")]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/volumes/rewards"]["readOnly"] is True


def _media_job(*media: dict[str, Any] | None, template: str = "qwen2_vl") -> dict[str, Any]:
    doc = base()
    doc["spec"]["model"]["template"] = template
    doc["spec"]["datasets"] = []
    for j, m in enumerate(media):
        ds: dict[str, Any] = {
            "name": f"mm{j}",
            "volume": {"claimName": "data", "subPath": f"mm{j}.jsonl"},
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
        }
        if m is not None:
            ds["media"] = m
        doc["spec"]["datasets"].append(ds)
    doc["spec"]["stages"] = [{"name": "sft", "type": "sft", "datasets": [f"mm{j}" for j in range(len(media))]}]
    return doc


def test_multimodal_validation() -> None:
    validate(_media_job({"claimName": "data", "subPath": "media"}, {"claimName": "data", "subPath": "media"}))
    found = errors(_media_job({"claimName": "data", "subPath": "a"}, {"claimName": "data", "subPath": "b"}))
    assert "different media folders" in found["spec.stages[0].datasets"]
    found = errors(_media_job({"claimName": "data", "subPath": "../etc"}))
    assert "relative path" in found["spec.datasets[0].media.subPath"]
    doc = _media_job({"claimName": "data", "subPath": "m"})
    del doc["spec"]["datasets"][0]["columns"]["images"]
    assert "columns.images" in errors(doc)["spec.datasets[0].media"]
    doc = graph_job(SFT, RM, {**PPO, "rewardModel": {"volume": {"claimName": "m", "subPath": "/abs"}}})
    assert "relative path" in errors(doc)["spec.stages[2].rewardModel.volume.subPath"]


@pytest.mark.parametrize(
    ("template", "kind", "reads"),
    [
        ("qwen", "images", "is text-only"),  # a text template: LLaMA-Factory refuses any media
        ("llava", "videos", "reads only images"),
        ("qwen2_vl", "audios", "reads only images, videos"),
        ("qwen2_audio", "images", "reads only audios"),
    ],
)
def test_media_columns_need_a_template_that_takes_them(template: str, kind: str, reads: str) -> None:
    doc = _media_job({"claimName": "data", "subPath": "media"}, template=template)
    cols = doc["spec"]["datasets"][0]["columns"]
    cols.pop("images")
    cols[kind] = kind
    found = errors(doc)
    message = found.pop(f"spec.datasets[0].columns.{kind}")
    assert f"spec.model.template {template!r} {reads}" in message, message
    assert f"LLaMA-Factory refuses {kind}" in message
    assert not found, found  # one error, on the column


@pytest.mark.parametrize(
    ("template", "kinds"),
    [
        ("llava", ["images"]),
        ("qwen2_vl", ["images", "videos"]),
        ("qwen2_audio", ["audios"]),
        ("qwen2_omni", ["images", "videos", "audios"]),
    ],
)
def test_media_columns_a_template_takes_are_accepted(template: str, kinds: list[str]) -> None:
    doc = _media_job({"claimName": "data", "subPath": "media"}, template=template)
    cols = doc["spec"]["datasets"][0]["columns"]
    cols.pop("images")
    cols.update({k: k for k in kinds})
    validate(doc)


def test_media_rule_suggests_templates_and_leaves_unknown_templates_to_their_own_rule() -> None:
    doc = _media_job(None, template="qwen")
    message = errors(doc)["spec.datasets[0].columns.images"]
    assert "(qwen2_vl, qwen3_vl, llava, gemma3 and " in message
    found = errors(_media_job(None, template="qwen2-vl"))
    assert "unknown LLaMA-Factory template" in found["spec.model.template"]
    assert "spec.datasets[0].columns.images" not in found
