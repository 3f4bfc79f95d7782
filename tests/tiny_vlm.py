"""A tiny LLaVA (CLIP vision tower + the tiny Qwen2 text model) and a tiny image dataset, built locally.

Why LLaVA: its processor is a CLIP image processor, which transformers 5 runs on PIL
(``CLIPImageProcessorPil``) with no torchvision. Qwen2-VL's processor needs torchvision (its video processor),
and PyPI only offers CUDA builds of torchvision, which do not import beside the CPU torch the tests use
(``RuntimeError: operator torchvision::nms does not exist``: its ``_C.so`` needs ``libc10_cuda.so``).
LLaMA-Factory's ``llava`` template and plugin then run unchanged: each ``<image>`` placeholder of a message is
expanded to one ``<image>`` token per vision patch (28x28 pixels in 14x14 patches: 4 tokens, the CLS feature
dropped by the ``default`` feature strategy), and the model replaces those tokens with the projected patches.

About 190k parameters; the build takes a few seconds, mostly importing transformers. Deterministic for a seed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.local.tinymodel import CHATML_TEMPLATE, build_tokenizer, tiny_qwen2_config

#: LLaMA-Factory's template for LLaVA-1.5 models (``mm_plugin`` ``llava``, placeholder ``<image>``).
TEMPLATE = "llava"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 28
PATCH_SIZE = 14
#: Tokens one image becomes: the patches (the CLS feature is dropped by the ``default`` strategy).
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
SUBPATH = "tiny-llava"

COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 210, 40)}


def build_tiny_vlm(directory: str | Path, seed: int = 0) -> Path:
    """Tokenizer (with ``<image>`` as one special token), LlavaProcessor and a random LlavaForConditionalGeneration."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(directory)
    tokenizer = build_tokenizer(out, seed=seed, extra_special_tokens=(IMAGE_TOKEN,))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature
        image_token=IMAGE_TOKEN,
        chat_template=CHATML_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    text = tiny_qwen2_config(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, do_sample=False
    )
    model.save_pretrained(str(out))
    return out


def shared_tiny_vlm(factory: pytest.TempPathFactory) -> Path:
    """The tiny VLM, built once per session in ``<basetemp>/shared-models/`` (atomically: a sibling folder
    renamed into place, so an interrupted build is never mistaken for a complete one)."""
    model_dir = factory.getbasetemp() / "shared-models" / SUBPATH
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SUBPATH}.", dir=model_dir.parent))
    try:
        build_tiny_vlm(tmp)
        tmp.rename(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def _row(content: str, answer: str, images: list[str]) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
        "images": images,
    }


def build_color_data(directory: str | Path, rows: int = 8) -> tuple[Path, Path]:
    """PNG images of plain colours in ``<directory>/media/`` (sizes that are not the model's, so the processor
    resizes them) and ``<directory>/colors.jsonl`` (sharegpt, an ``images`` column of paths relative to the
    media folder; one row with two images). Returns (data file, media folder)."""
    from PIL import Image

    out = Path(directory)
    media = out / "media"
    (media / "plain").mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (32 + 8 * i, 30), rgb).save(media / "plain" / f"{name}.png")
    names = list(COLORS)
    data = [
        _row("<image>What color is this?", f"It is {names[i % len(names)]}.", [f"plain/{names[i % len(names)]}.png"])
        for i in range(rows - 1)
    ]
    data.append(_row("<image><image>Which colors?", "The red and the blue.", ["plain/red.png", "plain/blue.png"]))
    path = out / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return path, media
