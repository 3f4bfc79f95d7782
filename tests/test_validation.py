"""Validation: every bad spec gets its exact field path and a reason; every problem is reported at once.

Table-driven: each case mutates a small valid base spec and names the path and a word of the message it
expects. A case passes only if *that* error is reported (other errors may be reported too, but the base spec
is valid on its own, so in practice each case yields exactly the errors it provokes).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import SpecError
from finetune_operator.validation import check, is_quantity, load_documents, validate

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict[str, Any]:
    """A small valid job: sft (LoRA) then dpo (LoRA), merge on, serve off."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {
            "model": {"volume": {"claimName": "models", "subPath": "qwen2"}, "template": "qwen"},
            "datasets": [
                {
                    "name": "chat",
                    "volume": {"claimName": "data", "subPath": "chat.jsonl"},
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages"},
                },
                {
                    "name": "prefs",
                    "volume": {"claimName": "data", "subPath": "prefs.jsonl"},
                    "formatting": "sharegpt",
                    "ranking": True,
                    "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                },
            ],
            "output": {"volume": {"claimName": "outputs"}},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "datasets": ["chat"],
                    "method": "lora",
                    "lora": {"rank": 8, "target": "all"},
                    "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "4", "memory": "16Gi"},
                    "args": {"learning_rate": 1.0e-4, "num_train_epochs": 1.0, "cutoff_len": 1024},
                },
                {
                    "name": "dpo",
                    "type": "dpo",
                    "datasets": ["prefs"],
                    "method": "lora",
                    "args": {"pref_beta": 0.1, "pref_loss": "sigmoid"},
                },
            ],
            "merge": {"enabled": True},
        },
    }


_PATH = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str | int]:
    return [int(idx) if idx else key for key, idx in _PATH.findall(path)]


def put(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``path`` (``spec.stages[0].args.x``) to ``value``, creating mappings on the way."""

    def apply(obj: dict[str, Any]) -> None:
        parts = _parts(path)
        cur: Any = obj
        for part in parts[:-1]:
            if isinstance(part, str) and part not in cur:
                cur[part] = {}
            cur = cur[part]
        last = parts[-1]
        if isinstance(cur, list) and isinstance(last, int) and last == len(cur):
            cur.append(copy.deepcopy(value))  # `put("spec.stages[2]", ...)` appends a third stage
        else:
            cur[last] = copy.deepcopy(value)

    return apply


def drop(path: str) -> Callable[[dict[str, Any]], None]:
    def apply(obj: dict[str, Any]) -> None:
        parts = _parts(path)
        cur: Any = obj
        for part in parts[:-1]:
            cur = cur[part]
        del cur[parts[-1]]

    return apply


def both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(obj: dict[str, Any]) -> None:
        for m in mutations:
            m(obj)

    return apply


KTO_DATA = {"name": "fb", "volume": {"claimName": "data", "subPath": "fb.jsonl"}, "columns": {"prompt": "p"}}
FULL_STAGE = {"name": "full", "type": "sft", "datasets": ["chat"], "method": "full"}
LORA_STAGE = {"name": "more", "type": "sft", "datasets": ["chat"], "method": "lora"}

# (id, mutation, expected path, word expected in the message)
BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # --- shape (pydantic), with wire paths ---
    ("unknown-spec-field", put("spec.modle", {}), "spec.modle", "did you mean 'model'"),
    ("unknown-nested-field", put("spec.stages[0].lora.rnak", 4), "spec.stages[0].lora.rnak", "unknown field"),
    ("missing-template", drop("spec.model.template"), "spec.model.template", "required"),
    ("missing-output", drop("spec.output"), "spec.output", "required"),
    ("wrong-api-version", put("apiVersion", "finetune.dev/v1"), "apiVersion", "unsupported value"),
    ("wrong-kind", put("kind", "FinetuneJob"), "kind", "FineTuneJob"),
    ("unknown-backend", put("spec.backend", "pytorch"), "spec.backend", "did you mean 'pytorchjob'"),
    ("unknown-stage-type", put("spec.stages[0].type", "grpo"), "spec.stages[0].type", "unsupported value 'grpo'"),
    ("unknown-method", put("spec.stages[0].method", "dora"), "spec.stages[0].method", "unsupported value"),
    ("unknown-formatting", put("spec.datasets[0].formatting", "openai"), "spec.datasets[0].formatting", "sharegpt"),
    ("unknown-hub", put("spec.model.hub", "github"), "spec.model.hub", "modelscope"),
    (
        "zero-stage-4",
        put("spec.stages[0].deepspeed", {"zeroStage": 4}),
        "spec.stages[0].deepspeed.zeroStage",
        "less than or equal to 3",
    ),
    (
        "offload-without-zero",
        put("spec.stages[0].deepspeed", {"zeroStage": 0, "offload": True}),
        "spec.stages[0].deepspeed.offload",
        "zeroStage",
    ),
    ("nodes-0", put("spec.stages[0].resources.nodes", 0), "spec.stages[0].resources.nodes", "greater than"),
    ("negative-retries", put("spec.retries", -1), "spec.retries", "greater than or equal to 0"),
    ("retries-as-string", put("spec.retries", "2"), "spec.retries", "expected an integer"),
    (
        "lora-target-type",
        put("spec.stages[0].lora.target", 5),
        "spec.stages[0].lora.target",
        "expected a string or a list",
    ),
    ("stage-name-not-dns", put("spec.stages[0].name", "SFT_1"), "spec.stages[0].name", "DNS-1123"),
    ("run-id-not-dns", put("spec.runId", "Run_2"), "spec.runId", "DNS-1123"),
    ("run-id-is-stage", put("spec.runId", "sft"), "spec.runId", "stage or step name"),
    ("run-id-too-long", put("spec.runId", "r" * 21), "spec.runId", "at most 20"),
    ("run-id-not-string", put("spec.runId", 2), "spec.runId", "expected a string"),
    ("dataset-name-comma", put("spec.datasets[0].name", "a,b"), "spec.datasets[0].name", "no commas"),
    ("no-stages", put("spec.stages", []), "spec.stages", "at least 1"),
    ("claim-not-dns", put("spec.output.volume.claimName", "Out_Puts"), "spec.output.volume.claimName", "DNS-1123"),
    # --- names ---
    ("job-name-uppercase", put("metadata.name", "Demo"), "metadata.name", "DNS-1123"),
    ("job-name-too-long", put("metadata.name", "a" * 64), "metadata.name", "63"),
    ("namespace-not-dns", put("metadata.namespace", "ML.team"), "metadata.namespace", "DNS-1123"),
    ("stage-name-reserved", put("spec.stages[1].name", "merge"), "spec.stages[1].name", "reserved"),
    ("duplicate-stage", put("spec.stages[1].name", "sft"), "spec.stages[1].name", "duplicate stage name"),
    ("duplicate-dataset", put("spec.datasets[1].name", "chat"), "spec.datasets[1].name", "duplicate dataset"),
    # --- datasets and stage types ---
    (
        "undeclared-dataset",
        put("spec.stages[0].datasets", ["chat", "chatt"]),
        "spec.stages[0].datasets[1]",
        "undeclared dataset 'chatt'",
    ),
    ("dataset-listed-twice", put("spec.stages[0].datasets", ["chat", "chat"]), "spec.stages[0].datasets[1]", "twice"),
    ("dpo-on-plain-data", put("spec.stages[1].datasets", ["chat"]), "spec.stages[1].datasets[0]", "needs ranking data"),
    (
        "rm-on-plain-data",
        both(put("spec.stages[1].type", "rm"), put("spec.stages[1].datasets", ["prefs", "chat"])),
        "spec.stages[1].datasets[1]",
        "needs ranking data",
    ),
    (
        "sft-on-ranking-data",
        put("spec.stages[0].datasets", ["prefs"]),
        "spec.stages[0].datasets[0]",
        "cannot train on ranking data",
    ),
    (
        "kto-on-ranking-data",
        put("spec.stages[1].type", "kto"),
        "spec.stages[1].datasets[0]",
        "cannot train on ranking data",
    ),
    (
        "kto-without-kto-tag",
        both(
            put("spec.datasets[2]", KTO_DATA), put("spec.stages[1].type", "kto"), put("spec.stages[1].datasets", ["fb"])
        ),
        "spec.stages[1].datasets[0]",
        "ktoTag",
    ),
    (
        "sharegpt-with-alpaca-column",
        put("spec.datasets[0].columns.prompt", "instruction"),
        "spec.datasets[0].columns.prompt",
        "alpaca",
    ),
    (
        "alpaca-with-tags",
        both(put("spec.datasets[2]", KTO_DATA), put("spec.datasets[2].tags", {"roleTag": "r"})),
        "spec.datasets[2].tags",
        "sharegpt",
    ),
    (
        "ranking-without-rejected",
        drop("spec.datasets[1].columns.rejected"),
        "spec.datasets[1].columns.rejected",
        "rejected",
    ),
    (
        "sub-path-escapes",
        put("spec.datasets[0].volume.subPath", "../secrets/x.json"),
        "spec.datasets[0].volume.subPath",
        "relative",
    ),
    ("absolute-sub-path", put("spec.model.volume.subPath", "/etc"), "spec.model.volume.subPath", "relative"),
    # --- model ---
    ("unknown-template", put("spec.model.template", "qwenn"), "spec.model.template", "did you mean 'qwen'"),
    ("bad-hub-id", put("spec.model.source", "https://hf.co/x y"), "spec.model.source", "hub model id"),
    (
        "lora-target-spaces",
        put("spec.stages[0].lora.target", "q_proj, v_proj"),
        "spec.stages[0].lora.target",
        "module names",
    ),
    (
        "lora-target-list-item",
        put("spec.stages[0].lora.target", ["q_proj", ""]),
        "spec.stages[0].lora.target[1]",
        "module name",
    ),
    (
        "secret-name",
        put("spec.model.tokenSecretRef", {"name": "HF Token", "key": "token"}),
        "spec.model.tokenSecretRef.name",
        "Secret name",
    ),
    (
        "secret-key",
        put("spec.model.tokenSecretRef", {"name": "hf", "key": "a/b"}),
        "spec.model.tokenSecretRef.key",
        "Secret key",
    ),
    # --- methods and stage order ---
    ("lora-block-on-full", put("spec.stages[0].method", "full"), "spec.stages[0].lora", "lora and qlora only"),
    ("full-after-lora", put("spec.stages[2]", FULL_STAGE), "spec.stages[2].method", "adapters"),
    (
        "qlora-after-two-adapters",
        both(put("spec.stages[2]", LORA_STAGE), put("spec.stages[2].method", "qlora")),
        "spec.stages[2].method",
        "single",
    ),
    (
        "zero3-after-two-adapters",
        both(put("spec.stages[2]", LORA_STAGE), put("spec.stages[2].deepspeed", {"zeroStage": 3})),
        "spec.stages[2].method",
        "ZeRO-3",
    ),
    # --- resources ---
    ("cpu-not-quantity", put("spec.stages[0].resources.cpu", "2 cores"), "spec.stages[0].resources.cpu", "quantity"),
    ("memory-gb", put("spec.stages[0].resources.memory", "16GB"), "spec.stages[0].resources.memory", "quantity"),
    ("merge-memory", put("spec.merge.resources", {"memory": "-1Gi"}), "spec.merge.resources.memory", "quantity"),
    # --- serve ---
    (
        "tp-larger-than-gpus",
        both(put("spec.serve", {"enabled": True, "tensorParallelSize": 4, "resources": {"gpusPerNode": 2}})),
        "spec.serve.tensorParallelSize",
        "larger than the GPUs",
    ),
    (
        "tp-default-one-gpu",
        put("spec.serve", {"enabled": True, "tensorParallelSize": 2}),
        "spec.serve.tensorParallelSize",
        "gpusPerNode = 1",
    ),
    ("serve-owned-flag", put("spec.serve.args", ["--served-model-name=x"]), "spec.serve.args[0]", "servedModelName"),
    (
        "serve-stacked-adapters",
        both(put("spec.merge.enabled", False), put("spec.serve", {"enabled": True})),
        "spec.merge.enabled",
        "single LoRA adapter",
    ),
    (
        "serve-max-lora-rank",
        both(
            put("spec.merge.enabled", False),
            drop("spec.stages[1]"),
            put("spec.serve", {"enabled": True, "maxLoraRank": 4}),
        ),
        "spec.serve.maxLoraRank",
        "smaller than the LoRA rank 8",
    ),
    # --- scheduling ---
    ("queue-not-label", put("spec.scheduling.queueName", "team a"), "spec.scheduling.queueName", "label value"),
    (
        "toleration-exists-value",
        put("spec.scheduling.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
        "spec.scheduling.tolerations[0].value",
        "empty",
    ),
    (
        "toleration-seconds-noschedule",
        put(
            "spec.scheduling.tolerations",
            [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}],
        ),
        "spec.scheduling.tolerations[0].tolerationSeconds",
        "NoExecute",
    ),
    (
        "node-selector-key",
        put("spec.scheduling.nodeSelector", {"bad key!": "x"}),
        'spec.scheduling.nodeSelector["bad key!"]',
        "label key",
    ),
    # --- LLaMA-Factory args: reserved, secrets, names, types, choices, combinations ---
    (
        "reserved-output-dir",
        put("spec.stages[0].args.output_dir", "/x"),
        "spec.stages[0].args.output_dir",
        "spec.output",
    ),
    (
        "reserved-template",
        put("spec.stages[0].args.template", "qwen"),
        "spec.stages[0].args.template",
        "spec.model.template",
    ),
    (
        "reserved-finetuning-type",
        put("spec.stages[0].args.finetuning_type", "lora"),
        "spec.stages[0].args.finetuning_type",
        "spec.stages[].method",
    ),
    (
        "reserved-deepspeed",
        put("spec.stages[0].args.deepspeed", "ds.json"),
        "spec.stages[0].args.deepspeed",
        "spec.stages[].deepspeed",
    ),
    (
        "reserved-quantization-bit",
        put("spec.stages[0].args.quantization_bit", 4),
        "spec.stages[0].args.quantization_bit",
        "qlora",
    ),
    (
        "reserved-lora-rank-with-block",
        put("spec.stages[0].args.lora_rank", 4),
        "spec.stages[0].args.lora_rank",
        "lora.rank",
    ),
    (
        "reserved-lora-alpha-without-block",
        both(drop("spec.stages[0].lora"), put("spec.stages[0].args.lora_alpha", 16)),
        "spec.stages[0].args.lora_alpha",
        "lora.alpha",
    ),
    (
        "reserved-resume",
        put("spec.stages[0].args.resume_from_checkpoint", "/x"),
        "spec.stages[0].args.resume_from_checkpoint",
        "resumes",
    ),
    (
        "secret-in-args",
        put("spec.stages[0].args.hf_hub_token", "hf_abc"),
        "spec.stages[0].args.hf_hub_token",
        "tokenSecretRef",
    ),
    (
        "unknown-arg",
        put("spec.stages[0].args.lerning_rate", 1.0e-4),
        "spec.stages[0].args.lerning_rate",
        "did you mean 'learning_rate'",
    ),
    (
        "arg-wrong-type-str",
        put("spec.stages[0].args.learning_rate", "fast"),
        "spec.stages[0].args.learning_rate",
        "expected a number",
    ),
    (
        "arg-quoted-number",
        put("spec.stages[0].args.learning_rate", "1e-4"),
        "spec.stages[0].args.learning_rate",
        "without quotes",
    ),
    (
        "arg-bool-is-not-number",
        put("spec.stages[0].args.num_train_epochs", True),
        "spec.stages[0].args.num_train_epochs",
        "wrong type",
    ),
    (
        "arg-float-for-int",
        put("spec.stages[0].args.cutoff_len", 1024.5),
        "spec.stages[0].args.cutoff_len",
        "expected an integer",
    ),
    ("arg-string-for-bool", put("spec.stages[0].args.bf16", "yes"), "spec.stages[0].args.bf16", "true/false"),
    (
        "arg-bad-scheduler",
        put("spec.stages[0].args.lr_scheduler_type", "cosin"),
        "spec.stages[0].args.lr_scheduler_type",
        "did you mean 'cosine'",
    ),
    (
        "arg-bad-pref-loss",
        put("spec.stages[1].args.pref_loss", "sigmoidd"),
        "spec.stages[1].args.pref_loss",
        "invalid choice",
    ),
    (
        "bf16-and-fp16",
        both(put("spec.stages[0].args.bf16", True), put("spec.stages[0].args.fp16", True)),
        "spec.stages[0].args.fp16",
        "both",
    ),
    (
        "dora-on-full",
        both(
            put("spec.stages[0].method", "full"),
            drop("spec.stages[0].lora"),
            drop("spec.stages[1]"),
            put("spec.stages[0].args.use_dora", True),
        ),
        "spec.stages[0].args.use_dora",
        "lora and qlora only",
    ),
    (
        "freeze-arg-on-lora",
        put("spec.stages[0].args.freeze_trainable_layers", 2),
        "spec.stages[0].args.freeze_trainable_layers",
        "freeze only",
    ),
    (
        "sft-only-arg-on-dpo",
        put("spec.stages[1].args.mask_history", True),
        "spec.stages[1].args.mask_history",
        "only valid for sft",
    ),
    ("eval-without-val-size", put("spec.stages[0].args.do_eval", True), "spec.stages[0].args.do_eval", "val_size"),
    ("galore-with-lora", put("spec.stages[0].args.use_galore", True), "spec.stages[0].args.use_galore", "LoRA"),
    (
        "pure-bf16-zero3",
        both(put("spec.stages[0].deepspeed", {"zeroStage": 3}), put("spec.stages[0].args.pure_bf16", True)),
        "spec.stages[0].args.pure_bf16",
        "ZeRO-3",
    ),
    (
        "label-smoothing-non-sigmoid",
        both(put("spec.stages[1].args.pref_loss", "ipo"), put("spec.stages[1].args.dpo_label_smoothing", 0.1)),
        "spec.stages[1].args.dpo_label_smoothing",
        "sigmoid",
    ),
    (
        "infer-backend-in-training",
        put("spec.stages[0].args.infer_backend", "vllm"),
        "spec.stages[0].args.infer_backend",
        "spec.serve",
    ),
    (
        "vllm-arg-in-training",
        put("spec.stages[0].args.vllm_maxlen", 4096),
        "spec.stages[0].args.vllm_maxlen",
        "spec.serve",
    ),
    (
        "export-arg-in-training",
        put("spec.stages[0].args.export_quantization_bit", 4),
        "spec.stages[0].args.export_quantization_bit",
        "spec.merge",
    ),
    ("push-to-hub", put("spec.stages[0].args.push_to_hub", True), "spec.stages[0].args.push_to_hub", "credentials"),
    (
        "llama-pro-full",
        both(
            put("spec.stages[0].method", "full"),
            drop("spec.stages[0].lora"),
            drop("spec.stages[1]"),
            put("spec.stages[0].args.use_llama_pro", True),
        ),
        "spec.stages[0].args.use_llama_pro",
        "freeze or LoRA",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "word"), [pytest.param(m, p, w, id=i) for i, m, p, w in BAD])
def test_bad_spec_names_path_and_reason(mutate: Callable[[dict[str, Any]], None], path: str, word: str) -> None:
    obj = base()
    mutate(obj)
    with pytest.raises(SpecError) as info:
        validate(obj)
    matching = [e for e in info.value.errors if e.path == path]
    assert matching, f"no error at {path}; got: {info.value.render()}"
    assert any(word in e.message for e in matching), f"{word!r} not in {[e.message for e in matching]}"


def test_table_is_large_and_ids_unique() -> None:
    ids = [case[0] for case in BAD]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)


# Valid variants: decisions documented in finetune_operator.validation.
GOOD: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("base", lambda obj: None),
    ("run-id", put("spec.runId", "2026-06-01")),
    ("multi-node-indexed-job", both(put("spec.backend", "job"), put("spec.stages[0].resources.nodes", 4))),
    (
        "merge-without-adapters",
        both(drop("spec.stages[1]"), put("spec.stages[0].method", "full"), drop("spec.stages[0].lora")),
    ),
    (
        "serve-one-adapter-without-merge",
        both(drop("spec.stages[1]"), put("spec.merge.enabled", False), put("spec.serve", {"enabled": True})),
    ),
    (
        "serve-after-full-then-lora-without-merge",
        both(
            put("spec.stages[0]", FULL_STAGE),
            put("spec.stages[2]", LORA_STAGE),
            drop("spec.stages[1]"),
            put("spec.merge.enabled", False),
            put("spec.serve", {"enabled": True}),
        ),
    ),
    (
        "kto-with-tag",
        both(
            put("spec.datasets[2]", KTO_DATA),
            put("spec.datasets[2].columns.ktoTag", "label"),
            put("spec.stages[1].type", "kto"),
            put("spec.stages[1].datasets", ["fb"]),
        ),
    ),
    (
        "qlora-zero3-first",
        both(put("spec.stages[0].method", "qlora"), put("spec.stages[0].deepspeed", {"zeroStage": 3, "offload": True})),
    ),
    ("lora-target-list", put("spec.stages[0].lora.target", ["q_proj", "v_proj"])),
    (
        "serve-cpu-only-any-tp",
        put("spec.serve", {"enabled": True, "tensorParallelSize": 2, "resources": {"gpusPerNode": 0}}),
    ),
    ("qlora-continues-one-adapter", put("spec.stages[1].method", "qlora")),
    (
        "serve-after-continued-adapter",
        both(
            put("spec.stages[1].method", "qlora"),
            put("spec.merge.enabled", False),
            put("spec.serve", {"enabled": True}),
        ),
    ),
    (
        "optional-args",
        put(
            "spec.stages[0].args",
            {
                "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.1,
                "report_to": "none",
                "val_size": 0.1,
                "do_eval": True,
                "eval_strategy": "steps",
                "max_steps": 100,
            },
        ),
    ),
    ("quantities", put("spec.stages[0].resources", {"cpu": "500m", "memory": "1.5Gi"})),
    ("job-name-63", put("metadata.name", "a" * 63)),
]


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m in GOOD])
def test_valid_variants(mutate: Callable[[dict[str, Any]], None]) -> None:
    obj = base()
    mutate(obj)
    job, errors = check(obj)
    assert errors == []
    assert isinstance(job, FineTuneJob)


def test_every_error_reported_at_once() -> None:
    obj = base()
    put("spec.modle", 1)(obj)  # shape error
    put("spec.retries", -3)(obj)  # shape error
    put("spec.stages[0].datasets", ["nope"])(obj)  # semantic, while shape errors exist
    put("spec.model.template", "no-such-template")(obj)
    put("spec.stages[1].args.pref_los", "sigmoid")(obj)
    put("spec.stages[0].resources.memory", "lots")(obj)
    put("metadata.name", "Bad_Name")(obj)
    with pytest.raises(SpecError) as info:
        validate(obj)
    paths = {e.path for e in info.value.errors}
    assert {
        "spec.modle",
        "spec.retries",
        "spec.stages[0].datasets[0]",
        "spec.model.template",
        "spec.stages[1].args.pref_los",
        "spec.stages[0].resources.memory",
        "metadata.name",
    } <= paths
    text = str(info.value)
    assert text.startswith(f"invalid FineTuneJob: {len(info.value.errors)} errors")


def test_malformed_parts_do_not_crash_rules() -> None:
    """Rules read the raw object: wrong shapes anywhere give errors, never exceptions."""
    for mutate in (
        put("spec", "x"),
        put("spec.stages", "x"),
        put("spec.stages[0]", 5),
        put("spec.datasets", {}),
        put("spec.stages[0].args", [1]),
        put("spec.serve", []),
        put("metadata", None),
        put("spec.scheduling.tolerations", [None]),
        put("spec.stages[0].datasets", [None, 3]),
    ):
        obj = base()
        mutate(obj)
        _, errors = check(obj)
        assert errors


def test_mapping_views_are_accepted() -> None:
    """The operator passes kopf's mapping views, not dicts: validation must not care."""
    from types import MappingProxyType

    def freeze(value: Any) -> Any:
        if isinstance(value, dict):
            return MappingProxyType({k: freeze(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(freeze(v) for v in value)
        return value

    assert validate(freeze(base())).spec.stages[0].name == "sft"


def test_status_never_makes_the_spec_invalid() -> None:
    obj = base()
    obj["status"] = {"state": "Running", "reported": {"sft": {"step": 3, "totalSteps": 10, "loss": 1.5}}}
    job = validate(obj)
    assert job.status is not None and job.status.reported["sft"].step == 3
    obj["status"] = {"stages": "not a list", "conditions": [{"bogus": True}]}
    job = validate(obj)
    assert job.status is None


def test_non_mapping_document() -> None:
    _, errors = check(["a"])
    assert errors[0].path == "<document>" and "mapping" in errors[0].message


def test_parsed_job_keeps_values() -> None:
    job = validate(base())
    assert job.spec.stages[1].args["pref_beta"] == 0.1
    assert job.spec.resolved_backend() == "job"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1", True),
        ("500m", True),
        ("1.5Gi", True),
        ("2e3", True),
        ("64Gi", True),
        ("1GB", False),
        ("-1", False),
        ("", False),
        ("1 Gi", False),
        ("Gi", False),
    ],
)
def test_quantity(value: str, ok: bool) -> None:
    assert is_quantity(value) is ok


# --- load_documents ---------------------------------------------------------------------------------------


def test_load_documents_multi_doc_and_floats(tmp_path: Path) -> None:
    f = tmp_path / "jobs.yaml"
    f.write_text("---\na: 1e-4\nb: 1.0e-3\nc: '1e-4'\nd: 10\n---\n---\nkind: X\n", encoding="utf-8")
    docs = load_documents(f)
    assert docs == [{"a": 1e-4, "b": 1e-3, "c": "1e-4", "d": 10}, {"kind": "X"}]


def test_load_documents_syntax_error_has_position(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("spec:\n  stages: [a, b\n  x: 1\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_documents(f)
    assert "YAML error at line 3" in info.value.errors[0].message


def test_load_documents_rejects_duplicate_keys(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text("spec:\n  args: {a: 1}\n  retries: 1\n  args: {b: 2}\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_documents(f)
    assert "duplicate key 'args'" in info.value.errors[0].message
    assert "line 4" in info.value.errors[0].message


def test_load_documents_keeps_merge_keys(tmp_path: Path) -> None:
    f = tmp_path / "merge.yaml"
    f.write_text("a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\n", encoding="utf-8")
    assert load_documents(f) == [{"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}]


def test_load_documents_rejects_non_mapping(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_documents(f)


def test_load_documents_is_safe(tmp_path: Path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("a: !!python/object/apply:os.system ['true']\n", encoding="utf-8")
    with pytest.raises(SpecError):
        load_documents(f)


@pytest.mark.parametrize("path", sorted((ROOT / "manifests" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    for doc in load_documents(path):
        validate(doc)


def test_runtime_path_imports_no_torch_or_llamafactory() -> None:
    import subprocess

    code = (
        "import sys, yaml\n"
        "from finetune_operator.validation import validate\n"
        f"validate(yaml.safe_load(open({str(ROOT / 'manifests/examples/06-contract-sft-dpo-merge-serve.yaml')!r})))\n"
        "bad = [m for m in ('torch', 'llamafactory', 'transformers', 'kopf', 'kubernetes') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _all_paths(value: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out += [path, *_all_paths(sub, path)]
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            path = f"{prefix}[{i}]"
            out += [path, *_all_paths(sub, path)]
    return out


def test_any_wrong_value_anywhere_gives_errors_not_exceptions() -> None:
    """Every node of the base spec replaced by values of every JSON type: check() never raises, and
    whatever it rejects it rejects with a path that exists in the document or names a missing field."""
    replacements: list[Any] = [None, 0, -1, 2.5, True, "", "x" * 2000, [], [None], {}, {"k": None}]
    for path in _all_paths(base()):
        for value in replacements:
            obj = base()
            put(path, value)(obj)
            job, errors = check(obj)
            assert (job is None) == bool(errors), (path, value)
            for err in errors:
                assert err.path and err.message, (path, value, err)
