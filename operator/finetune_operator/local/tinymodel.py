"""A tiny Qwen2-architecture model and tiny datasets, built locally and deterministically.

Why build instead of download: the demo, the tests and the benchmark must run with no network and no GPU, in
about a minute on two CPU cores. A ~130k-parameter model with a byte-level BPE tokenizer trained on the spot is
enough for LLaMA-Factory to run every code path (SFT on sharegpt and alpaca data, DPO, LoRA merge) and for vLLM's
CPU backend to serve the result (it needs a head dimension of at least 32, hence 2 heads of 32 with hidden 64).

The ChatML chat template and the ``<|im_end|>`` end-of-turn token make LLaMA-Factory's ``qwen`` template apply
unchanged: its stop word must already be a single special token of the tokenizer.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

#: Special tokens, in id order (0, 1, 2).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512
#: LLaMA-Factory template that matches the tokenizer's chat template.
TEMPLATE = "qwen"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = (
    "the cat",
    "a robot",
    "the river",
    "my friend",
    "the operator",
    "a small model",
    "the cluster",
    "the teacher",
    "a bird",
    "the engine",
)
_VERBS = ("sees", "likes", "builds", "follows", "trains", "finds", "moves", "reads", "counts", "paints")
_OBJECTS = (
    "a tree",
    "the moon",
    "three apples",
    "a red box",
    "the data",
    "a long road",
    "the answer",
    "two stones",
    "a green door",
    "the light",
)
_COLORS = ("red", "blue", "green", "yellow", "black", "white")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def _corpus(rng: random.Random, lines: int = 400) -> list[str]:
    out = []
    for i in range(lines):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(_sentence(rng).capitalize())
        out.append(f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}? It is {a + b}.")
        out.append(f"The color of item {i} is {rng.choice(_COLORS)}.")
    return out


def _qa(rng: random.Random) -> tuple[str, str, str]:
    """A question, a good answer and a worse answer (for DPO pairs)."""
    a, b = rng.randrange(10), rng.randrange(10)
    q = f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}?"
    return q, f"It is {a + b}.", f"It is {(a + b + 1 + rng.randrange(5)) % 19}, maybe."


def _train_tokenizer(corpus: list[str], out_dir: Path, extra_special_tokens: tuple[str, ...] = ()) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus + [f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")], trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra_special_tokens],
        model_max_length=512,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tokenizer(
    directory: str | os.PathLike[str], seed: int = 0, extra_special_tokens: tuple[str, ...] = ()
) -> Any:
    """The tiny model's tokenizer, saved in ``directory``; ``extra_special_tokens`` get the ids after
    :data:`SPECIAL_TOKENS` (a vision-language model's ``<image>`` placeholder must be one token)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    return _train_tokenizer(_corpus(random.Random(seed)), out, extra_special_tokens)


def tiny_qwen2_config(tokenizer: Any) -> Any:
    """The tiny Qwen2 text model's config for ``tokenizer`` (also the language model of the tests' tiny VLM)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def build_tiny_model(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Create a tokenizer and a randomly initialised Qwen2 model in ``directory`` (created if missing).

    Deterministic for a given ``seed``: the same text, the same tokenizer, the same weights. Returns the
    directory. Takes a few seconds (mostly importing transformers).
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a 0.5 MB model needs no bar

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tokenizer = _train_tokenizer(_corpus(rng), out)
    config = tiny_qwen2_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(str(out))
    return out


def _write_json(path: Path, data: Any, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


#: Files :func:`build_demo_data` writes (relative to its directory) and what they are.
DEMO_FILES = {
    "sft_sharegpt": "sft-chat.jsonl",
    "sft_alpaca": "sft-alpaca.json",
    "dpo_pairs": "dpo-pairs.jsonl",
}


def build_demo_data(directory: str | os.PathLike[str], seed: int = 0, rows: int = 32) -> dict[str, Path]:
    """Write the demo datasets into ``directory`` and return their paths by kind.

    - ``sft_sharegpt``: sharegpt JSON lines, ``messages`` with role/content and a leading system message;
    - ``sft_alpaca``: alpaca JSON with *custom* column names (``question``, ``context``, ``answer``) so the
      spec's column mapping is exercised;
    - ``dpo_pairs``: sharegpt preference pairs (``messages``, ``chosen``, ``rejected``).
    """
    out = Path(directory)
    rng = random.Random(seed + 1)
    chat, alpaca, pairs = [], [], []
    for i in range(rows):
        q, good, bad = _qa(rng)
        chat.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": good},
                    {"role": "user", "content": "Say it again."},
                    {"role": "assistant", "content": good},
                ]
            }
        )
        alpaca.append(
            {
                "question": f"Describe item {i}.",
                "context": _sentence(rng),
                "answer": f"Item {i} is {rng.choice(_COLORS)}.",
            }
        )
        pairs.append(
            {
                "messages": [{"role": "user", "content": q}],
                "chosen": {"role": "assistant", "content": good},
                "rejected": {"role": "assistant", "content": bad},
            }
        )
    paths = {kind: out / name for kind, name in DEMO_FILES.items()}
    _write_json(paths["sft_sharegpt"], chat, lines=True)
    _write_json(paths["sft_alpaca"], alpaca)
    _write_json(paths["dpo_pairs"], pairs, lines=True)
    return paths
