"""Multimodal data for real: a tiny LLaVA (tests/tiny_vlm.py) trained with LoRA on images through
``ftctl run --local`` (the preflight data check, LLaMA-Factory's ``llava`` template and plugin, the stage's
``media_dir``), and the data check reading every image a row names, with file and line for the bad ones."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.types import FineTuneJob
from finetune_operator.render.plan import PathResolver
from finetune_operator.worker import markers
from finetune_operator.worker.preflight import check_data
from tests import tiny_vlm
from tests.test_local_run import FTCTL, lf_env

pytestmark = pytest.mark.train

TAGS = {"roleTag": "role", "contentTag": "content", "userTag": "user", "assistantTag": "assistant"}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.shared_tiny_vlm(tmp_path_factory)


def job_doc(args: dict[str, Any] | None = None, merge: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny-vlm"},
        "spec": {
            "backend": "job",
            "model": {"volume": {"claimName": "vlm-models", "subPath": tiny_vlm.SUBPATH}, "template": "llava"},
            "datasets": [
                {
                    "name": "colors",
                    "volume": {"claimName": "vlm-data", "subPath": "colors.jsonl"},
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages", "images": "images"},
                    "tags": TAGS,
                    "media": {"claimName": "vlm-data", "subPath": "media"},
                }
            ],
            "output": {"volume": {"claimName": "vlm-outputs"}},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "datasets": ["colors"],
                    "method": "lora",
                    "lora": {"rank": 8},
                    "resources": {"gpusPerNode": 0},
                    "args": args or {},
                }
            ],
            "merge": {"enabled": True, "exportSize": 1, "exportDevice": "cpu", "resources": {"gpusPerNode": 0}}
            if merge
            else {"enabled": False},
            "serve": {"enabled": False},
        },
    }


def test_tiny_vlm_is_a_llava_with_a_pil_processor(vlm: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(vlm))
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(tiny_vlm.IMAGE_TOKEN, add_special_tokens=False)) == ["<image>"]
    config = AutoConfig.from_pretrained(str(vlm))
    assert config.model_type == "llava" and config.image_token_index == tok.convert_tokens_to_ids("<image>")


def test_data_check_reads_every_image_and_names_the_bad_rows(vlm: Path, tmp_path: Path) -> None:
    data, media = tiny_vlm.build_color_data(tmp_path / "vlm-data", rows=4)
    (media / "not-an-image.png").write_text("plain text\n")
    rows = data.read_text().splitlines()
    first = json.loads(rows[0])  # "<image>What color is this?" on plain/red.png
    question, *rest = first["messages"]
    twice = {
        "messages": [{**question, "content": "<image>" + question["content"]}, *rest],
        "images": first["images"] * 2,
    }
    bad = [
        twice,  # valid: the same row with the image twice
        {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "Red."}]},
        {
            "messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "Red."}],
            "images": ["plain/red.png", "plain/blue.png"],
        },
        {
            "messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "Red."}],
            "images": ["plain/purple.png"],
        },
        {
            "messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "Red."}],
            "images": ["not-an-image.png"],
        },
    ]
    data.write_text("\n".join(rows + [json.dumps(b) for b in bad]) + "\n")
    resolver = PathResolver(
        volume_root=str(tmp_path), config_dir=str(tmp_path / "cfg"), claims={"vlm-models": str(vlm.parent)}
    )
    job = FineTuneJob.model_validate(job_doc({"cutoff_len": 256}))
    stage = check_data(job, resolver, str(vlm))["sft"]
    (ds,) = stage.datasets
    assert (ds.rows, ds.valid) == (9, 5), ds
    # placeholder/image count mismatches (either way) are LLaMA-Factory's ValueError; unreadable files are media
    assert ds.dropped == {"malformed": 2, "media": 2}, ds.dropped
    assert ds.first_error is not None and ds.first_error.startswith(f"{data}:6: cannot tokenise: ValueError")
    assert "number of images does not match" in ds.first_error
    # the images went through the model's processor: each one is TOKENS_PER_IMAGE tokens of the sample
    assert ds.lengths[4] - ds.lengths[0] == tiny_vlm.TOKENS_PER_IMAGE


@pytest.mark.slow
def test_lora_sft_on_images_then_merge_with_ftctl_run_local(vlm: Path, tmp_path: Path) -> None:
    """Three LoRA steps on image-text pairs, CPU, then the merge. LoRA also targets the vision tower
    (``freeze_vision_tower: false``): its LoRA B matrices start at zero and move only if the images' pixels
    reached the model, so the adapter proves the images were trained on, not only their placeholder tokens.
    The merged model is a LLaVA again, with its processor, and answers about an image."""
    workdir = tmp_path / "wd"
    tiny_vlm.build_color_data(workdir / "vlm-data")
    spec = tmp_path / "job.yaml"
    args = {
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-2,
        "logging_steps": 1,
        "save_steps": 3,
        "cutoff_len": 256,
        "freeze_vision_tower": False,
    }
    spec.write_text(yaml.safe_dump(job_doc(args, merge=True)))
    argv = [FTCTL, "run", "--local", "-f", str(spec), "--workdir", str(workdir)]
    argv += ["--volume", f"vlm-models={vlm.parent}"]
    proc = subprocess.run(argv, env=lf_env(), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "colors: 8 rows, 8 valid" in proc.stderr, proc.stderr

    state = json.loads((workdir / ".finetune/tiny-vlm/outputs.json").read_text())
    out = workdir / "vlm-outputs" / "tiny-vlm" / "sft"
    assert state["outputs"]["adapters"] == [str(out)]
    cfg = yaml.safe_load((workdir / ".finetune/tiny-vlm/config/sft.yaml").read_text())
    assert cfg["template"] == "llava" and cfg["media_dir"] == str(workdir / "vlm-data" / "media")

    marker = markers.read_marker(out)
    assert marker is not None and marker["steps"] == marker["totalSteps"] == 3
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert losses[-1] < losses[0], losses  # seeded weights and data: it learns the colours a little
    assert marker["finalLoss"] > 0

    # LLaMA-Factory's llava plugin expanded each <image> to one token per patch (the log shows the first sample)
    log = (workdir / ".finetune/tiny-vlm/logs/sft.log").read_text()
    assert "USER: " + "<image>" * tiny_vlm.TOKENS_PER_IMAGE + "What color is this?" in log

    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    vision_b = {k: v for k, v in weights.items() if "vision_tower" in k and "lora_B" in k}
    text_b = {k: v for k, v in weights.items() if "language_model" in k and "lora_B" in k}
    assert vision_b and text_b, sorted(weights)[:20]
    assert any(bool(v.abs().sum() > 0) for v in vision_b.values()), "the vision tower's LoRA did not move"
    assert any(bool(v.abs().sum() > 0) for v in text_b.values())
    assert (out / "processor_config.json").is_file()  # the processor travels with the adapter (merge, serve)

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = Path(state["outputs"]["mergedModel"])
    assert markers.read_marker(merged) is not None
    base = load_file(str(vlm / "model.safetensors"))
    new = {k: v for f in merged.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(new) == set(base)
    moved = {k for k in base if not torch.equal(base[k], new[k])}
    assert any("vision_tower" in k for k in moved) and any("language_model" in k for k in moved), sorted(moved)
    model = AutoModelForImageTextToText.from_pretrained(str(merged))
    processor = AutoProcessor.from_pretrained(str(merged))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image = Image.open(workdir / "vlm-data" / "media" / "plain" / "red.png")
    inputs = processor(images=[image], text="USER: <image>What color is this? ASSISTANT:", return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (tiny_vlm.IMAGE_SIZE, tiny_vlm.IMAGE_SIZE)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
