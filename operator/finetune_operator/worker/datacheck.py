"""The data check: every dataset of a stage through LLaMA-Factory's own conversion, template and tokenisation.

Runs on CPU with the stage's generated config (the same ``<stage>.yaml`` and ``dataset_info.json`` the training
pod gets) and the base model's tokenizer; no model weights are loaded. For each dataset file it reads every row
itself, so that a broken row can be named by file and line (LLaMA-Factory's loader would either crash on the
whole file or silently skip the row), then passes each row through:

1. LLaMA-Factory's dataset converter for the formatting (alpaca/sharegpt) with the dataset's column and tag
   mapping -- this is where wrong roles and wrong turn counts are found (its own "Invalid role tag" /
   "Invalid message count" warnings are captured as the reason);
2. the stage's dataset processor (supervised, pairwise, feedback, pretrain) with the stage's template -- it
   drops what LLaMA-Factory would drop and yields the token ids, from which the lengths are taken (with the
   cutoff lifted, so that truncation can be counted).

Like LLaMA-Factory, only the first ``max_samples`` rows of each dataset are used. The result is plain data
(:class:`finetune_operator.estimate.data.StageData`) for the estimator, ``ftctl plan`` and ``status.plan``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from finetune_operator.errors import DataError
from finetune_operator.estimate.data import DatasetStats, StageData

#: How many characters of a bad row the first-error message quotes.
QUOTE = 80
#: Cutoff used to measure untruncated lengths.
UNLIMITED = 1 << 30
#: LLaMA-Factory's converter warnings -> our drop reason.
CONVERTER_REASONS = (("Invalid role tag", "wrong_roles"), ("Invalid message count", "wrong_turns"))


class _Capture(logging.Handler):
    """Collects LLaMA-Factory's converter warnings for the row being converted."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _rows_json(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, row, error) for a JSON array file; one error row when the file is not an array."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            yield exc.lineno, None, f"not valid JSON: {exc.msg}"
            return
        yield 1, None, f"expected a JSON array of rows, found {type(doc).__name__}"
        return
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield line, None, f"not valid JSON: {exc.msg}"
            return  # the rest of the array cannot be located reliably
        yield line, row, None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield number, None, f"not valid JSON: {exc.msg}"


def _rows_other(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """csv/parquet/arrow/txt through the datasets library, as LLaMA-Factory loads them (row numbers, not lines)."""
    from datasets import load_dataset  # type: ignore[import-untyped]
    from llamafactory.extras.constants import FILEEXT2TYPE

    kind = FILEEXT2TYPE[path.suffix.lstrip(".").lower()]
    data = load_dataset(kind, data_files=str(path), split="train")
    for index, row in enumerate(data, start=1):
        yield index, dict(row), None


def _reader(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _rows_jsonl
    if suffix == ".json":
        # LLaMA-Factory (the datasets json builder) reads both arrays and JSON lines from .json files.
        head = path.read_text(encoding="utf-8", errors="replace")[:4096].lstrip()
        return _rows_json if head.startswith("[") else _rows_jsonl
    return _rows_other


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def _columns(attr: Any) -> tuple[list[str], list[str]]:
    """(required, optional) column names of a dataset, from its LLaMA-Factory attributes."""
    required = [attr.messages] if attr.formatting == "sharegpt" else [attr.prompt, attr.response]
    if attr.ranking:
        required += [attr.chosen, attr.rejected]
        if attr.formatting != "sharegpt":
            required.remove(attr.response)
    if attr.kto_tag:
        required.append(attr.kto_tag)
    optional = [attr.query, attr.history, attr.system, attr.tools, attr.images, attr.videos, attr.audios]
    if attr.formatting == "sharegpt":
        optional = [attr.system, attr.tools, attr.images, attr.videos, attr.audios]
    req = [c for c in required if c]
    return req, [c for c in optional if c and c not in req]


def _texts(aligned: Mapping[str, Any]) -> list[str]:
    msgs = list(aligned.get("_prompt") or []) + list(aligned.get("_response") or [])
    return [str(m.get("content") or "") for m in msgs if isinstance(m, Mapping)]


def _lengths(stage: str, model_inputs: Mapping[str, list[Any]]) -> tuple[int, int] | None:
    """(length, tokens) of one processed example: pairs give the longer side and both sides' tokens."""
    if stage == "rm" or "chosen_input_ids" in model_inputs:
        chosen, rejected = model_inputs.get("chosen_input_ids") or [], model_inputs.get("rejected_input_ids") or []
        if not chosen or not rejected:
            return None
        return max(len(chosen[0]), len(rejected[0])), len(chosen[0]) + len(rejected[0])
    ids = model_inputs.get("input_ids") or []
    if not ids:
        return None
    return len(ids[0]), len(ids[0])


def _lf_stage(stage: str) -> str:
    """The processor LLaMA-Factory picks: dpo uses the pairwise one like rm."""
    return "rm" if stage in ("rm", "dpo") else stage


def check_stage(
    cfg: Mapping[str, Any], *, name: str = "", tokenizer_dir: str | os.PathLike[str] | None = None
) -> StageData:
    """Check every dataset of one stage's LLaMA-Factory config (``<stage>.yaml`` as a dict).

    ``tokenizer_dir`` is the base model (a later stage's ``model_name_or_path`` does not exist yet before the
    pipeline runs; the tokenizer is the same). Raises :class:`DataError` only when the configuration itself
    cannot be used (unknown dataset name, unknown template); problems of the data are in the result.
    """
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.loader import _get_dataset_processor
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.hparams.model_args import ProcessorArguments
    from llamafactory.model import load_tokenizer
    from transformers import HfArgumentParser

    data_keys = {f.name for f in fields(DataArguments)}
    data_cfg = {k: v for k, v in cfg.items() if k in data_keys}
    stage = str(cfg.get("stage", "sft"))
    try:
        (data_args,) = HfArgumentParser(DataArguments).parse_dict(data_cfg, allow_extra_keys=True)
        model_path = str(tokenizer_dir or cfg["model_name_or_path"])
        # The stage's image/video/audio settings (image_max_pixels, video_fps, ...) shape the multimodal
        # processor, hence how many placeholder tokens each image becomes.
        media_cfg = {k: v for k, v in cfg.items() if k in {f.name for f in fields(ProcessorArguments)}}
        (model_args,) = HfArgumentParser(ModelArguments).parse_dict(
            {
                **media_cfg,
                "model_name_or_path": model_path,
                "trust_remote_code": bool(cfg.get("trust_remote_code", False)),
            },
            allow_extra_keys=True,
        )
        loaded = load_tokenizer(model_args)
        tokenizer, mm_processor = loaded["tokenizer"], loaded["processor"]
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        attrs = get_dataset_list(data_args.dataset, data_args.dataset_dir)
    except (ValueError, OSError, KeyError) as exc:
        raise DataError(f"cannot prepare the data check: {exc}") from exc

    unlimited = copy.copy(data_args)
    unlimited.cutoff_len = UNLIMITED
    unlimited.packing = False
    # The model's multimodal processor (None for text models), as in training: without it LLaMA-Factory's
    # multimodal plugin refuses every row with media ("Processor was not found").
    processor = _get_dataset_processor(unlimited, _lf_stage(stage), template, tokenizer, mm_processor)
    max_samples = data_args.max_samples
    stats = [
        _check_dataset(
            ds_name, attr, data_args, processor, stage, data_args.cutoff_len, max_samples, get_dataset_converter
        )
        for ds_name, attr in zip(data_args.dataset or [], attrs, strict=True)
    ]
    return StageData(stage=name or stage, cutoff_len=data_args.cutoff_len, datasets=stats)


def _check_dataset(
    name: str,
    attr: Any,
    data_args: Any,
    processor: Any,
    stage: str,
    cutoff: int,
    max_samples: int | None,
    converter_for: Any,
) -> DatasetStats:
    path = Path(os.path.join(data_args.dataset_dir, attr.dataset_name))
    ds = DatasetStats(name=name, file=str(path))
    if attr.load_from != "file":
        ds.error = f"loaded from {attr.load_from}, not a file: not checked"
        return ds
    if not path.exists():
        ds.error = f"{path} does not exist"
        return ds
    required, optional = _columns(attr)
    converter = converter_for(attr.formatting, attr, data_args)
    capture = _Capture()
    lf_logger = logging.getLogger("llamafactory.data.converter")
    lf_logger.addHandler(capture)
    # One warning per bad row would flood the log: the reasons are counted instead.
    propagate, lf_logger.propagate = lf_logger.propagate, False
    try:
        for file in _files(path):
            if max_samples is not None and ds.rows >= max_samples:
                break
            try:
                reader = _reader(file)
            except OSError as exc:
                ds.error = f"{file}: cannot read: {exc.strerror or exc}"
                return ds
            try:
                for line, row, error in reader(file):
                    if max_samples is not None and ds.rows >= max_samples:
                        break
                    ds.rows += 1
                    reason = error and "malformed"
                    detail = error
                    if error and error.startswith("not valid JSON") and ds.unparseable is None:
                        ds.unparseable = f"{file}:{line}"
                    if reason is None:
                        reason, detail = _check_row(
                            row, required, optional, converter, processor, stage, capture, ds, cutoff
                        )
                    if reason is not None:
                        ds.dropped[reason] = ds.dropped.get(reason, 0) + 1
                        if ds.first_error is None:
                            ds.first_error = f"{file}:{line}: {detail}"
            except (OSError, UnicodeDecodeError, KeyError, ValueError) as exc:
                ds.error = f"{file}: cannot read: {exc}"
                return ds
    finally:
        lf_logger.removeHandler(capture)
        lf_logger.propagate = propagate
    return ds


def _check_row(
    row: Any,
    required: list[str],
    optional: list[str],
    converter: Any,
    processor: Any,
    stage: str,
    capture: _Capture,
    ds: DatasetStats,
    cutoff: int,
) -> tuple[str | None, str | None]:
    """Convert and tokenise one row; (reason, detail) when it is dropped, else (None, None) and ``ds`` updated."""
    if not isinstance(row, dict):
        return "malformed", f"a row must be a JSON object, found {type(row).__name__}"
    missing = [c for c in required if c not in row]
    if missing:
        return "missing_columns", f"missing column {', '.join(repr(c) for c in missing)} (has {sorted(row)[:8]})"
    full = {**{c: None for c in optional}, **row}  # the datasets loader gives absent optional columns None
    capture.messages.clear()
    try:
        aligned = converter(full)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        return "malformed", f"cannot convert: {type(exc).__name__}: {exc}"[: QUOTE * 2]
    for needle, reason in CONVERTER_REASONS:
        if any(needle in m for m in capture.messages):
            return reason, f"{needle.lower()} ({_quote(row)})"
    texts = _texts(aligned)
    if not any(t.strip() for t in texts):
        return "empty", f"no text ({_quote(row)})"
    batch = {
        k: [aligned.get(k)] for k in ("_prompt", "_response", "_system", "_tools", "_images", "_videos", "_audios")
    }
    try:
        model_inputs = processor.preprocess_dataset(batch)
    except OSError as exc:  # an image/video/audio the row names is missing or not a readable file of its kind
        return "media", f"cannot read its media: {type(exc).__name__}: {exc}"[: QUOTE * 2]
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        return "malformed", f"cannot tokenise: {type(exc).__name__}: {exc}"[: QUOTE * 2]
    measured = _lengths(stage, model_inputs)
    if measured is None:
        return "invalid", f"dropped by LLaMA-Factory's {stage} processor ({_quote(row)})"
    length, tokens = measured
    ds.valid += 1
    ds.lengths.append(length)
    if length > cutoff:
        ds.truncated += 1
    pair = tokens != length
    ds.tokens += min(tokens, 2 * cutoff) if pair else min(tokens, cutoff)
    return None, None


def _quote(row: Any) -> str:
    text = json.dumps(row, ensure_ascii=False)
    return text if len(text) <= QUOTE else text[: QUOTE - 1] + "…"
