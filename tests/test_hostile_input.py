"""Hostile and careless input files: every one ends in exit 1 or 2 with a field path or a file name, never a
traceback, and in the same exit code for ``validate``, ``render`` and ``run`` (they read files alike).

Each case was a traceback (or minutes of CPU and gigabytes of memory) before the reader was bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.validation import loading
from tests.test_validation import base


def _spec_text() -> str:
    return yaml.safe_dump(base(), sort_keys=False)


def _with_args(extra: str) -> str:
    text = _spec_text()
    anchor = "      cutoff_len: 1024\n"
    assert anchor in text
    return text.replace(anchor, anchor + extra)


def _billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


#: name -> (file bytes, exit code, words the error must contain)
CASES: dict[str, tuple[Callable[[], bytes], int, tuple[str, ...]]] = {
    "non-string-key-int": (lambda: _with_args("      1: 2\n").encode(), 1, ("spec.stages[0].args[1]",)),
    "non-string-key-null": (lambda: _with_args("      null: 2\n").encode(), 1, ("spec.stages[0].args[null]",)),
    "non-string-key-on": (lambda: _with_args("      on: 2\n").encode(), 1, ("spec.stages[0].args[true]",)),
    "non-string-key-spec": (
        lambda: _spec_text().replace("spec:\n", "spec:\n  7: x\n", 1).encode(),
        1,
        ("spec[7]", "keys must be strings"),
    ),
    "recursive-alias": (
        lambda: _spec_text().replace("  merge:\n", "  merge: &m\n    x: *m\n", 1).encode(),
        1,
        ("recursive alias", "line"),
    ),
    "deep-nesting": (lambda: _with_args("      x: " + "[" * 20000 + "]" * 20000 + "\n").encode(), 1, ("levels deep",)),
    "billion-laughs": (lambda: _billion_laughs().encode(), 1, ("expands to more than",)),
    "too-large": (lambda: b"# " + b"x" * (loading.MAX_FILE_BYTES + 10) + b"\n", 1, ("larger than",)),
    "not-utf8": (lambda: _spec_text().replace("demo", "d\xe9mo").encode("latin-1"), 1, ("not UTF-8", "line 4")),
    "empty": (lambda: b"", 1, ("no FineTuneJob",)),
    "only-a-configmap": (
        lambda: b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        1,
        ("no FineTuneJob",),
    ),
}


@pytest.mark.parametrize("command", ["validate", "render", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_a_clear_error(case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, code, words = CASES[case]
    path = tmp_path / "job.yaml"
    path.write_bytes(make())
    argv = [command, "-f", str(path)]
    if command == "run":
        argv += ["--local", "--workdir", str(tmp_path / "work")]
    started = time.monotonic()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert time.monotonic() - started < 10  # bounded work, not minutes of alias expansion
    for word in words:
        assert word in err, err


def test_workdir_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(_spec_text(), encoding="utf-8")
    (tmp_path / "work").write_text("a file", encoding="utf-8")
    rc = main(["run", "-f", str(spec), "--local", "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is not a directory" in err and "work" in err


def test_render_output_dir_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(_spec_text(), encoding="utf-8")
    (tmp_path / "out").write_text("a file", encoding="utf-8")
    rc = main(["render", "-f", str(spec), "-o", str(tmp_path / "out")])
    assert rc == 2
    assert "cannot write" in capsys.readouterr().err


def test_mixed_kinds_validate_and_render_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate skips documents of other kinds; render skips them too (it used to fail on them)."""
    path = tmp_path / "mixed.yaml"
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "notes"}, "data": {"a": "b"}}
    path.write_text(yaml.safe_dump_all([configmap, base()], sort_keys=False), encoding="utf-8")
    assert main(["validate", "-f", str(path)]) == 0
    assert main(["render", "-f", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "skipped document 1 (ConfigMap)" in err
    assert "kind: ConfigMap" in out  # the job's own ConfigMap, rendered
    assert "name: notes" not in out


def test_same_job_twice_in_one_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "twice.yaml"
    second = base()
    second["spec"]["stages"][0]["args"]["learning_rate"] = 2.0e-4
    path.write_text(yaml.safe_dump_all([base(), second], sort_keys=False), encoding="utf-8")
    assert main(["validate", "-f", str(path)]) == 1
    assert "metadata.name: FineTuneJob ml/demo is already defined in document 1" in capsys.readouterr().err
    assert main(["render", "-f", str(path), "-o", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    # the same name in another namespace is another object: both render, each into its own folder
    second["metadata"]["namespace"] = "other"
    path.write_text(yaml.safe_dump_all([base(), second], sort_keys=False), encoding="utf-8")
    assert main(["render", "-f", str(path), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "ml" / "demo" / "00-shared.yaml").is_file()
    assert (tmp_path / "out" / "other" / "demo" / "00-shared.yaml").is_file()


def test_small_aliases_still_load() -> None:
    """Aliases are legal YAML that kubectl reads: only unbounded expansion is refused."""
    docs = loading.parse_documents("a: &x {k: 1}\nb: *x\nc: [*x, *x]\n")
    assert docs == [{"a": {"k": 1}, "b": {"k": 1}, "c": [{"k": 1}, {"k": 1}]}]
