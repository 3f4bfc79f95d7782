"""The training worker's logic that needs no training: input checks and their exit codes, resume decisions,
failure diagnosis, signal forwarding to the whole process tree, and the completion-marker no-op."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune_operator.errors import DataError, ModelNotFoundError, OutOfMemoryError, TrainingError
from finetune_operator.worker import markers
from finetune_operator.worker.process import ChildResult, diagnose
from finetune_operator.worker.train import check_inputs, resume_overrides

FTCTL = str(Path(sys.executable).parent / "ftctl")


def _model(tmp_path: Path) -> Path:
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "tokenizer.json").write_text("{}")
    return m


def _cfg(tmp_path: Path, **extra: object) -> dict[str, object]:
    data = tmp_path / "chat.jsonl"
    if not data.exists():
        data.write_text('{"messages": []}\n')
    entry = {"file_name": str(data), "formatting": "sharegpt", "columns": {"messages": "messages"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": entry}))
    cfg: dict[str, object] = {
        "model_name_or_path": str(_model(tmp_path) if not (tmp_path / "model").exists() else tmp_path / "model"),
        "dataset": "chat",
        "dataset_dir": str(tmp_path),
        "output_dir": str(tmp_path / "out"),
    }
    cfg.update(extra)
    return cfg


def test_check_inputs_ok(tmp_path: Path) -> None:
    check_inputs(_cfg(tmp_path))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"model_name_or_path": "/nonexistent/model"}, ModelNotFoundError, "base model not found"),
        ({"adapter_name_or_path": "/nonexistent/sft"}, ModelNotFoundError, "adapter of an earlier stage"),
        ({"dataset": "chat,missing"}, DataError, "'missing' is not described"),
        ({"stage": "ppo", "reward_model": "/nonexistent/rm"}, ModelNotFoundError, "reward model not found"),
    ],
    ids=["model", "adapter", "undeclared-dataset", "reward-model"],
)
def test_check_inputs_errors(tmp_path: Path, change: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        check_inputs(_cfg(tmp_path, **change))


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ('{"messages": [oops\n', "line 1 is not JSON")],
    ids=["empty", "not-json"],
)
def test_check_inputs_bad_data_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "chat.jsonl").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        check_inputs(_cfg(tmp_path))
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"messages": []}\n{"messages": []}\n{"messages": [oops\n', r"chat\.jsonl line 3 is not JSON"),
        ('{"messages": []}\n\n[1, 2]\n', r"chat\.jsonl line 3 is not a JSON object"),
        ('{"conversations": []}\n{"text": "x"}\n', r"no column 'messages' .*columns found: conversations, text"),
        ("\n\n", "has no records"),
    ],
    ids=["corrupt-row-3", "not-an-object", "wrong-columns", "blank-lines"],
)
def test_data_check_names_file_line_and_columns(tmp_path: Path, content: str, message: str) -> None:
    """Every row is read (a corrupt row N used to end as DatasetGenerationError), and missing columns name the
    dataset, the file and the columns found (they used to end as ``KeyError: 'messages'``)."""
    (tmp_path / "chat.jsonl").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        check_inputs(_cfg(tmp_path))
    assert "dataset 'chat'" in str(info.value)
    assert info.value.exit_code == 3


def test_data_check_json_array_position_and_utf8(tmp_path: Path) -> None:
    data = tmp_path / "chat.json"
    data.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    entry = {"file_name": str(data), "formatting": "sharegpt", "columns": {"messages": "messages"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": entry}))
    cfg = _cfg(tmp_path)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": entry}))
    with pytest.raises(DataError, match=r"chat\.json is not valid JSON: .* at line 3, column"):
        check_inputs(cfg)
    data.write_bytes(b'[{"messages": ["caf\xe9"]}]')
    with pytest.raises(DataError, match="not UTF-8"):
        check_inputs(cfg)


def test_alpaca_defaults_need_their_columns(tmp_path: Path) -> None:
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    cfg = _cfg(tmp_path)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": str(data)}}))
    with pytest.raises(DataError, match="no column 'input'"):  # LLaMA-Factory reads example['input']
        check_inputs(cfg)
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    check_inputs(cfg)


def test_model_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    """A model folder without tokenizer files used to train on an empty tokenizer and exit 0."""
    cfg = _cfg(tmp_path)
    (tmp_path / "model" / "tokenizer.json").unlink()
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no tokenizer files") as info:
        check_inputs(cfg)
    assert info.value.exit_code == 4
    (tmp_path / "model" / "tokenizer.model").write_bytes(b"sp")
    check_inputs(cfg)


def test_worker_turns_an_unwritable_output_into_a_message(tmp_path: Path) -> None:
    """An OSError on the output volume (read-only, a file in the way) is a message naming the file and a
    termination message, not a traceback."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    cfg = _cfg(tmp_path, output_dir=str(tmp_path / "blocker" / "sft"))
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps(cfg))
    term = tmp_path / "termination-log"
    term.write_text("")
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FT_TERMINATION_LOG": str(term)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "blocker" in proc.stderr and "Not a directory" in proc.stderr
    assert "blocker" in term.read_text()


def test_missing_data_file(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    (tmp_path / "chat.jsonl").unlink()
    with pytest.raises(DataError, match="does not exist"):
        check_inputs(cfg)


def _checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    if complete:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


def test_resume_decisions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert resume_overrides({}, out, primary=True) == []  # fresh
    out.mkdir()
    (out / "trainer_log.jsonl").write_text("{}\n")
    assert resume_overrides({}, out, primary=True) == ["overwrite_output_dir=true"]  # leftovers, no checkpoint
    _checkpoint(out, 2)
    assert resume_overrides({}, out, primary=True) == []  # LLaMA-Factory resumes from checkpoint-2
    assert resume_overrides({"overwrite_output_dir": True}, out, primary=True) == ["overwrite_output_dir=false"]
    torn = _checkpoint(out, 4, complete=False)
    assert resume_overrides({}, out, primary=True) == []
    assert not torn.exists() and list(out.glob(".incomplete-checkpoint-4-*"))  # resume from 2, not the torn 4
    assert resume_overrides({"resume_from_checkpoint": str(out / "checkpoint-2")}, out, primary=True) == []


@pytest.mark.parametrize(
    ("code", "tail", "error"),
    [
        (1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], OutOfMemoryError),
        (-9, ["..."], OutOfMemoryError),
        (1, ["ValueError: Undefined dataset foo in dataset_info.json."], DataError),
        (1, ["OSError: /m does not appear to have a file named config.json."], ModelNotFoundError),
        (1, ["RuntimeError: something else"], TrainingError),
    ],
    ids=["cuda-oom", "oom-killed", "dataset", "model", "other"],
)
def test_diagnose(code: int, tail: list[str], error: type[Exception]) -> None:
    err = diagnose(ChildResult(returncode=code, tail=["Traceback (most recent call last):", *tail]), "stage 'sft'")
    assert type(err) is error
    assert "stage 'sft'" in str(err)


def test_finished_stage_is_a_noop_without_launching(tmp_path: Path) -> None:
    out = tmp_path / "out"
    markers.write_marker(out, {"steps": 5, "finalLoss": 1.0})
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(json.dumps({"model_name_or_path": "/nonexistent", "output_dir": str(out), "dataset": "x"}))
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stderr


def test_exit_code_and_termination_message_for_missing_model(tmp_path: Path) -> None:
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(json.dumps({"model_name_or_path": "/nonexistent/qwen", "output_dir": str(tmp_path / "o")}))
    term = tmp_path / "termination-log"
    term.write_text("")
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FT_TERMINATION_LOG": str(term)},
    )
    assert proc.returncode == 4
    assert "base model not found: /nonexistent/qwen" in term.read_text()


def test_sigterm_is_forwarded_to_the_whole_child_process_group(tmp_path: Path) -> None:
    """A preempted pod: the worker gets SIGTERM; the child *and* its own children (torchrun's workers) stop,
    and the worker exits 143 so the retry resumes."""
    child = textwrap.dedent(
        """
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"ready {grandchild.pid}", flush=True)
        time.sleep(600)
        """
    )
    outer = textwrap.dedent(
        f"""
        import sys
        from finetune_operator.worker.process import run_child
        r = run_child([sys.executable, "-c", {child!r}], {{"PATH": "/usr/bin:/bin"}}, echo=sys.stdout)
        print(f"child returncode {{r.returncode}} signal {{r.signal}}", flush=True)
        sys.exit(128 + r.signal if r.signal else r.returncode)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", outer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), line
    grandchild = int(line.split()[1])
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 143
    assert "child returncode -15 signal 15" in rest
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not there in some containers counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path: Path) -> None:
    """T9k's DeepspeedJob runs the command through DeepSpeed's launcher, which appends ``--local_rank=N``."""
    from finetune_operator.cli import build_parser

    argv = ["worker", "train", "--config", "x.yaml", "max_steps=3", "--local_rank=1"]
    args = build_parser(argv).parse_args(argv)
    out = tmp_path / "out"
    markers.write_marker(out, {"steps": 3})
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(json.dumps({"output_dir": str(out)}))
    proc = subprocess.run(
        [FTCTL, "worker", "train", "--config", str(cfg), "max_steps=3", "--local_rank=1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert args.config == "x.yaml"
