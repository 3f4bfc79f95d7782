"""``ftctl validate`` and ``ftctl crd`` as a user runs them: the installed console script, in a subprocess.

Exit codes 0 (ok) / 1 (invalid spec) / 2 (usage: missing file, no arguments), errors on stderr with their
field paths, and never a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_validation import base

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def _ftctl() -> str:
    beside = Path(sys.executable).with_name("ftctl")
    found = str(beside) if beside.exists() else shutil.which("ftctl")
    if found is None:
        pytest.fail("the ftctl console script is not installed (pip install -e .)")
    return found


def ftctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([_ftctl(), *args], capture_output=True, text=True, input=stdin, timeout=120, cwd=ROOT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _write(path: Path, *docs: object) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


def test_valid_files_exit_0(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.yaml", base())
    proc = ftctl("validate", "-f", str(good), *(str(p) for p in EXAMPLES))
    assert proc.returncode == 0, proc.stderr
    assert f"{good}: ok" in proc.stdout.splitlines()
    assert proc.stdout.count(": ok") == 1 + len(EXAMPLES)
    assert proc.stderr == ""


def test_invalid_spec_exit_1_with_paths(tmp_path: Path) -> None:
    bad = base()
    bad["spec"]["stages"][1]["datasets"] = ["chat"]
    bad["spec"]["stages"][0]["args"]["lerning_rate"] = 0.1
    path = _write(tmp_path / "bad.yaml", bad)
    proc = ftctl("validate", "-f", str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"{path}: spec.stages[1].datasets[0]: stage type dpo needs ranking data" in proc.stderr
    assert "spec.stages[0].args.lerning_rate: unknown LLaMA-Factory argument" in proc.stderr
    assert "did you mean 'learning_rate'" in proc.stderr
    assert "2 errors" in proc.stderr


def test_mixed_files_exit_1_and_report_each(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.yaml", base())
    bad_doc = base()
    bad_doc["spec"]["retries"] = -1
    multi = _write(tmp_path / "multi.yaml", base(), bad_doc, {"apiVersion": "v1", "kind": "ConfigMap"})
    proc = ftctl("validate", "-f", str(good), "-f", str(multi))
    assert proc.returncode == 1
    assert f"{good}: ok" in proc.stdout
    assert f"{multi}[0]: ok" in proc.stdout
    assert f"{multi}[1]: spec.retries:" in proc.stderr
    assert "ConfigMap" not in proc.stderr  # other kinds are skipped


def test_yaml_syntax_error_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("spec: [unclosed\n", encoding="utf-8")
    proc = ftctl("validate", "-f", str(path))
    assert proc.returncode == 1
    assert "YAML error at line" in proc.stderr


def test_missing_file_exit_2(tmp_path: Path) -> None:
    proc = ftctl("validate", "-f", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml: cannot read" in proc.stderr


def test_missing_file_beats_invalid(tmp_path: Path) -> None:
    bad = base()
    bad["kind"] = "Other"
    bad_path = _write(tmp_path / "bad.yaml", {**bad, "kind": "FineTuneJob", "spec": {}})
    proc = ftctl("validate", "-f", str(bad_path), "-f", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2


def test_no_arguments_exit_2() -> None:
    proc = ftctl("validate")
    assert proc.returncode == 2
    assert "-f" in proc.stderr


def test_stdin() -> None:
    proc = ftctl("validate", "-f", "-", stdin=yaml.safe_dump(base()))
    assert proc.returncode == 0
    assert "-: ok" in proc.stdout


def test_crd_command_prints_the_committed_crd() -> None:
    proc = ftctl("crd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text(encoding="utf-8")
    crd = yaml.safe_load(proc.stdout)
    assert crd["kind"] == "CustomResourceDefinition"


def test_directory_validates_every_yaml_file() -> None:
    proc = ftctl("validate", "-f", str(ROOT / "manifests" / "examples"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok") >= len(EXAMPLES)


def test_directory_skips_other_manifests_but_not_misspelled_kinds(tmp_path: Path) -> None:
    _write(tmp_path / "a-job.yaml", base())
    _write(tmp_path / "b-configmap.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    (tmp_path / "notes.txt").write_text("not yaml: [", encoding="utf-8")
    proc = ftctl("validate", "-f", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{tmp_path / 'a-job.yaml'}: ok"]
    _write(tmp_path / "c-typo.yaml", {**base(), "kind": "FinetuneJob"})
    proc = ftctl("validate", "-f", str(tmp_path))
    assert proc.returncode == 1
    assert f"{tmp_path / 'c-typo.yaml'}: kind: unsupported value 'FinetuneJob'" in proc.stderr


def test_explicit_file_without_a_job_is_invalid(tmp_path: Path) -> None:
    path = _write(tmp_path / "cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap"})
    proc = ftctl("validate", "-f", str(path))
    assert proc.returncode == 1
    assert "no FineTuneJob found" in proc.stderr


def test_json_output(tmp_path: Path) -> None:
    import json

    bad = base()
    bad["spec"]["retries"] = -1
    good_path = _write(tmp_path / "good.yaml", base())
    bad_path = _write(tmp_path / "bad.yaml", bad)
    proc = ftctl(
        "validate", "-o", "json", "-f", str(good_path), "-f", str(bad_path), "-f", str(tmp_path / "missing.yaml")
    )
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert [(r["file"], r["valid"]) for r in report] == [
        (str(good_path), True),
        (str(bad_path), False),
        (str(tmp_path / "missing.yaml"), False),
    ]
    assert report[0]["name"] == "demo" and report[0]["errors"] == []
    assert report[1]["errors"][0]["path"] == "spec.retries"
    assert report[2]["error"].startswith("cannot read")
