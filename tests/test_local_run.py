"""``ftctl run --local`` with real LLaMA-Factory on CPU: the bundled demo (SFT on sharegpt + alpaca data, DPO on
top, merge), the outputs it reports, a re-run that does nothing, and the loss plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.local import demo
from finetune_operator.worker import markers

ROOT = Path(__file__).resolve().parents[1]
FTCTL = str(Path(sys.executable).parent / "ftctl")
SESSION = os.getpid()


def shared_tiny_model(factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per session (later callers find it complete: the build is atomic)."""
    return demo.ensure_tiny_model(factory.getbasetemp() / "shared-models" / demo.MODEL_SUBPATH)


def lf_env(**extra: str) -> dict[str, str]:
    """Environment for LLaMA-Factory subprocesses: offline, no version check, quiet tokenizers."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        DISABLE_VERSION_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ft-test-hf-home"),
    )
    # DeepSpeed JIT-builds a CPU communication op on first use behind a lock file in the extensions folder; a
    # build killed elsewhere leaves that lock behind and every later process waits on it forever. A folder of
    # this test session's own keeps runs independent (the op is built once per session).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / f"ft-test-torch-ext-{SESSION}"))
    for k in ("FT_JOB_NAME", "FT_JOB_NAMESPACE", "FORCE_TORCHRUN", "NNODES", "NPROC_PER_NODE", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_local(spec: Path, workdir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``ftctl run --local -f SPEC --workdir WORKDIR EXTRA...`` in :func:`lf_env`, its output captured."""
    argv = [FTCTL, "run", "--local", "-f", str(spec), "--workdir", str(workdir), *extra]
    return subprocess.run(argv, env=lf_env(), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory)


def test_bundled_demo_spec_matches_manifest() -> None:
    assert demo.demo_spec_text() == (ROOT / "manifests/examples/local-demo.yaml").read_text()


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    from finetune_operator.local.tinymodel import build_demo_data

    p1 = build_demo_data(tmp_path / "a")
    p2 = build_demo_data(tmp_path / "b")
    for kind in p1:
        assert p1[kind].read_bytes() == p2[kind].read_bytes()
    pairs = [json.loads(line) for line in p1["dpo_pairs"].read_text().splitlines()]
    assert all(len(p["messages"]) % 2 == 1 and p["chosen"]["content"] != p["rejected"]["content"] for p in pairs)
    alpaca = json.loads(p1["sft_alpaca"].read_text())
    assert set(alpaca[0]) == {"question", "context", "answer"}  # custom columns, mapped by the spec


@pytest.mark.train
def test_tiny_model_is_deterministic_and_chat_ready(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from finetune_operator.local.tinymodel import build_tiny_model

    other = build_tiny_model(tmp_path / "again")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (other / name).read_bytes() == (tiny_model / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vLLM's CPU attention needs head_dim >= 32


@pytest.mark.train
def test_local_demo_pipeline_sft_dpo_merge(tiny_model: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    data = workdir / demo.DATA_CLAIM
    from finetune_operator.local.tinymodel import build_demo_data

    build_demo_data(data)
    spec = tmp_path / "job.yaml"
    spec.write_text(demo.demo_spec_text())
    volume = f"{demo.MODEL_CLAIM}={tiny_model.parent}"
    proc = run_local(spec, workdir, "--volume", volume)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    state = json.loads((workdir / ".finetune/local-demo/outputs.json").read_text())
    outputs: dict[str, Any] = state["outputs"]
    out = workdir / "demo-outputs" / "local-demo"
    assert outputs["adapters"] == [str(out / "sft"), str(out / "dpo")]
    assert outputs["mergedModel"] == str(out / "merged")
    assert f"merged model: {out / 'merged'}" in proc.stderr

    for adapter in outputs["adapters"]:
        assert (Path(adapter) / "adapter_model.safetensors").is_file()
        marker = markers.read_marker(adapter)
        assert marker is not None and marker["steps"] == marker["totalSteps"] and marker["finalLoss"] > 0
    # SFT trained on both the sharegpt and the alpaca file; DPO on the preference pairs, on top of SFT.
    sft_log = (workdir / ".finetune/local-demo/logs/sft.log").read_text()
    assert "sft-chat.jsonl" in sft_log and "sft-alpaca.json" in sft_log
    dpo_cfg = yaml.safe_load((workdir / ".finetune/local-demo/config/dpo.yaml").read_text())
    assert dpo_cfg["adapter_name_or_path"] == str(out / "sft") and dpo_cfg["create_new_adapter"] is True
    assert json.loads((out / "dpo/trainer_log.jsonl").read_text().splitlines()[0])["total_steps"] == 4

    merged = Path(outputs["mergedModel"])
    assert markers.read_marker(merged) is not None
    assert not list(merged.parent.glob(".merged.partial"))
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is two plus three?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    base = load_file(str(tiny_model / "model.safetensors"))
    new = {k: v for f in merged.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    changed = [k for k in base if "proj" in k and not torch.equal(base[k], new[k])]
    assert changed, "merging the adapters changed no weight"

    # Re-running a finished pipeline is a no-op: nothing is retrained or re-merged.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_local(spec, workdir, "--volume", volume, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already complete") == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    png = tmp_path / "loss.png"
    plot = subprocess.run(
        [FTCTL, "plot", "--stage", str(out / "sft"), "-o", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.train
def test_missing_model_and_bad_data_exit_codes(tiny_model: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    from finetune_operator.local.tinymodel import build_demo_data

    paths = build_demo_data(workdir / demo.DATA_CLAIM)
    spec = tmp_path / "job.yaml"
    spec.write_text(demo.demo_spec_text())
    missing = run_local(spec, workdir, timeout=300)
    assert missing.returncode == 4, missing.stderr
    assert "base model not found" in missing.stderr
    paths["sft_sharegpt"].write_text('{"messages": [oops\n')
    bad = run_local(spec, workdir, "--volume", f"{demo.MODEL_CLAIM}={tiny_model.parent}", timeout=300)
    assert bad.returncode == 3, bad.stderr
    # the preflight step finds it before training starts: LLaMA-Factory's loader would fail on the whole file
    assert "InvalidData: stage sft: dataset chat:" in " ".join(bad.stderr.split())
    assert "sft-chat.jsonl:1 is not valid JSON" in "".join(bad.stderr.split("\n"))
