"""Issue 15's input rules: what a FineTuneJob may not ask for, and specs that used to pass validation and then
fail at pod start. Each case names the field and a word of the reason (and failed before its rule existed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.controller.runtime import OperatorConfig, make_validate
from finetune_operator.errors import SpecError
from finetune_operator.render import render
from finetune_operator.validation import Policy, check, validate
from tests.test_validation import base, both, put

SECRET = {"secretKeyRef": {"name": "vllm-secrets", "key": "api-key"}}

BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # item 7: fields that passed unchecked
    ("scheduler-uppercase", put("spec.scheduling.schedulerName", "Volcano"), "spec.scheduling.schedulerName", "DNS"),
    ("scheduler-newline", put("spec.scheduling.schedulerName", "a\nb"), "spec.scheduling.schedulerName", "DNS"),
    ("scheduler-space", put("spec.scheduling.schedulerName", "my scheduler"), "spec.scheduling.schedulerName", "DNS"),
    ("image-newline", put("spec.image", "reg.io/w:1\nkind: Secret"), "spec.image", "image reference"),
    ("image-space", put("spec.image", "reg.io/w 1"), "spec.image", "image reference"),
    ("serve-image-space", put("spec.serve.image", " vllm/vllm-openai"), "spec.serve.image", "image reference"),
    ("served-name-newline", put("spec.serve.servedModelName", "bot\nx"), "spec.serve.servedModelName", "model id"),
    ("served-name-space", put("spec.serve.servedModelName", "my bot"), "spec.serve.servedModelName", "model id"),
    ("vllm-port-prefix", put("spec.serve.args", ["--por", "9"]), "spec.serve.args[0]", "abbreviation of --port"),
    ("vllm-host-prefix", put("spec.serve.args", ["--hos=0.0.0.0"]), "spec.serve.args[0]", "--host"),
    ("vllm-name-prefix", put("spec.serve.args", ["--served-model", "x"]), "spec.serve.args[0]", "--served-model-name"),
    ("vllm-api-key-arg", put("spec.serve.args", ["--api-key", "sk-123"]), "spec.serve.args[0]", "apiKeySecretRef"),
    # item 5: env and secrets of the vLLM container
    (
        "env-hub-offline",
        put("spec.serve.env", [{"name": "HF_HUB_OFFLINE", "value": "0"}]),
        "spec.serve.env[0].name",
        "set by the operator",
    ),
    (
        "env-ld-preload",
        put("spec.serve.env", [{"name": "LD_PRELOAD", "value": "/x.so"}]),
        "spec.serve.env[0].name",
        "which code runs",
    ),
    (
        "env-pythonpath",
        put("spec.serve.env", [{"name": "PYTHONPATH", "value": "/x"}]),
        "spec.serve.env[0].name",
        "which code runs",
    ),
    (
        "env-api-key-plain",
        put("spec.serve.env", [{"name": "VLLM_API_KEY", "value": "sk-1"}]),
        "spec.serve.env[0].name",
        "apiKeySecretRef",
    ),
    (
        "env-value-and-from",
        put("spec.serve.env", [{"name": "A", "value": "1", "valueFrom": SECRET}]),
        "spec.serve.env[0]",
        "not both",
    ),
    (
        "env-duplicate",
        put("spec.serve.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "spec.serve.env[1].name",
        "duplicate",
    ),
    (
        "env-secret-bad-name",
        put("spec.serve.env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "Bad_N", "key": "k"}}}]),
        "spec.serve.env[0].valueFrom.secretKeyRef.name",
        "Secret name",
    ),
    (
        "api-key-bad-key",
        put("spec.serve.apiKeySecretRef", {"name": "s", "key": "a/b"}),
        "spec.serve.apiKeySecretRef.key",
        "Secret key",
    ),
    (
        "trust-remote-code-arg",
        put("spec.stages[0].args.trust_remote_code", True),
        "spec.stages[0].args.trust_remote_code",
        "does not allow",
    ),
    ("trust-remote-code-vllm", put("spec.serve.args", ["--trust-remote-code"]), "spec.serve.args[0]", "does not allow"),
    (
        "trust-remote-code-vllm-prefix",
        put("spec.serve.args", ["--trust-remote"]),
        "spec.serve.args[0]",
        "does not allow",
    ),
    # item 8: LLaMA-Factory arguments that fail at pod start or make no sense
    (
        "logging-steps-0",
        put("spec.stages[0].args.logging_steps", 0),
        "spec.stages[0].args.logging_steps",
        "greater than 0",
    ),
    ("logging-steps-frac", put("spec.stages[0].args.logging_steps", 2.5), "spec.stages[0].args.logging_steps", "whole"),
    ("seed-huge", put("spec.stages[0].args.seed", 2**80), "spec.stages[0].args.seed", "2**32-1"),
    ("seed-negative", put("spec.stages[0].args.seed", -1), "spec.stages[0].args.seed", "between 0 and"),
    (
        "batch-0",
        put("spec.stages[0].args.per_device_train_batch_size", 0),
        "spec.stages[0].args.per_device_train_batch_size",
        "at least 1",
    ),
    (
        "grad-accum-0",
        put("spec.stages[0].args.gradient_accumulation_steps", 0),
        "spec.stages[0].args.gradient_accumulation_steps",
        "at least 1",
    ),
    ("lr-negative", put("spec.stages[0].args.learning_rate", -1), "spec.stages[0].args.learning_rate", "at least 0"),
    ("lr-nan", put("spec.stages[0].args.learning_rate", float("nan")), "spec.stages[0].args.learning_rate", "range"),
    ("warmup-ratio", put("spec.stages[0].args.warmup_ratio", 1.5), "spec.stages[0].args.warmup_ratio", "between 0"),
    ("epochs-0", put("spec.stages[0].args.num_train_epochs", 0), "spec.stages[0].args.num_train_epochs", "greater"),
]


@pytest.mark.parametrize(("mutate", "path", "word"), [pytest.param(m, p, w, id=i) for i, m, p, w in BAD])
def test_bad_spec_names_path_and_reason(mutate: Callable[[dict[str, Any]], None], path: str, word: str) -> None:
    obj = base()
    mutate(obj)
    _, errors = check(obj)
    matching = [e for e in errors if e.path == path]
    assert matching, f"no error at {path}; got: {errors}"
    assert any(word in e.message for e in matching), f"{word!r} not in {[e.message for e in matching]}"


GOOD: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("scheduler-volcano", put("spec.scheduling.schedulerName", "volcano")),
    ("image-digest", put("spec.image", "registry.example.com:5000/team/worker@sha256:" + "a" * 64)),
    ("image-tag", put("spec.serve.image", "vllm/vllm-openai:v0.11.0")),
    ("served-name-org", put("spec.serve.servedModelName", "org/model-7b:v1")),
    ("vllm-other-flags", put("spec.serve.args", ["--max-loras", "2", "--enable-lora-bias", "--model-impl=vllm"])),
    ("env-secret", put("spec.serve.env", [{"name": "HF_TOKEN", "valueFrom": SECRET}])),
    ("env-plain", put("spec.serve.env", [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}])),
    ("api-key", put("spec.serve.apiKeySecretRef", {"name": "vllm-secrets", "key": "api-key"})),
    ("logging-ratio", put("spec.stages[0].args.logging_steps", 0.1)),
    ("seed-max", put("spec.stages[0].args.seed", 2**32 - 1)),
    ("lr-zero", put("spec.stages[0].args.learning_rate", 0.0)),
]


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i) for i, m in GOOD])
def test_good_variants(mutate: Callable[[dict[str, Any]], None]) -> None:
    obj = base()
    mutate(obj)
    validate(obj)


def test_serve_secrets_reach_the_deployment_as_secret_key_refs_only() -> None:
    obj = base()
    both(
        put("spec.serve", {"enabled": True}),
        put("spec.serve.env", [{"name": "HF_TOKEN", "valueFrom": SECRET}, {"name": "A", "value": "1"}]),
        put("spec.serve.apiKeySecretRef", {"name": "vllm-secrets", "key": "api-key"}),
    )(obj)
    dep = render(validate(obj)).step("serve").workload
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": SECRET}
    assert by_name["VLLM_API_KEY"] == {
        "name": "VLLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "vllm-secrets", "key": "api-key"}},
    }
    assert by_name["A"] == {"name": "A", "value": "1"}
    assert by_name["HF_HUB_OFFLINE"] == {"name": "HF_HUB_OFFLINE", "value": "1"}
    assert not any("api-key" in a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"])


def test_trust_remote_code_allowed_by_the_install() -> None:
    obj = base()
    put("spec.stages[0].args.trust_remote_code", True)(obj)
    put("spec.serve.args", ["--trust-remote-code"])(obj)
    with pytest.raises(SpecError):
        validate(obj)
    validate(obj, Policy(allow_trust_remote_code=True))
    config = OperatorConfig.from_env({"FT_ALLOW_TRUST_REMOTE_CODE": "true"})
    make_validate(config)(obj)


def test_the_operator_enforces_the_image_allowlist_itself() -> None:
    """No admission policy needed: the operator's own validation refuses images its install did not allow."""
    config = OperatorConfig.from_env(
        {"FT_WORKER_IMAGE": "reg.io/worker:1", "FT_ALLOWED_IMAGE_PREFIXES": "ml.io/team/", "FT_ALLOWED_IMAGES": "a/b:1"}
    )
    operator_validate = make_validate(config)
    for allowed in ("reg.io/worker:1", "ml.io/team/w:2", "a/b:1"):
        obj = base()
        obj["spec"]["image"] = allowed
        operator_validate(obj)
    obj = base()
    obj["spec"]["image"] = "evil.io/miner:latest"
    with pytest.raises(SpecError) as info:
        operator_validate(obj)
    assert [e.path for e in info.value.errors] == ["spec.image"]
    assert "not allowed" in info.value.errors[0].message
    obj = base()
    obj["spec"]["serve"] = {"enabled": True, "image": "evil.io/vllm:1"}
    with pytest.raises(SpecError) as info:
        operator_validate(obj)
    assert [e.path for e in info.value.errors] == ["spec.serve.image"]
    # `*` in the list: any image
    make_validate(OperatorConfig.from_env({"FT_ALLOWED_IMAGES": "*"}))(obj)
    # offline (ftctl) validation does not know the cluster's list
    validate(obj)


def test_ftctl_refuses_trust_remote_code_unless_allowed(tmp_path: Path) -> None:
    obj = base()
    put("spec.stages[0].args.trust_remote_code", True)(obj)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(obj), encoding="utf-8")
    for command in ("validate", "render"):
        assert main([command, "-f", str(path)]) == 1
        assert main([command, "-f", str(path), "--allow-trust-remote-code"]) == 0
