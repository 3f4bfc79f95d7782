"""Progress: following LLaMA-Factory's trainer log, and reporting it to the FineTuneJob's status subresource."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.worker.progress import Progress, StatusReporter, TrainerLogFollower, parse_record
from tests.install_tools import worker_identity

ROOT = Path(__file__).resolve().parents[1]


def _record(step: int, total: int = 10, loss: float | None = 1.0) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "current_steps": step,
        "total_steps": total,
        "epoch": step / total,
        "percentage": 100.0 * step / total,
        "elapsed_time": "0:00:01",
        "remaining_time": "0:00:09",
    }
    if loss is not None:
        rec["loss"] = loss
    return rec


def test_follower_reads_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "trainer_log.jsonl"
    f = TrainerLogFollower(log)
    assert f.poll() == []  # no file yet
    line1 = json.dumps(_record(1, loss=2.5)) + "\n"
    line2 = json.dumps(_record(2, loss=2.0))
    log.write_text(line1 + line2[:10])  # second line half-written
    got = f.poll()
    assert [p.step for p in got] == [1]
    with log.open("a") as fh:
        fh.write(line2[10:] + "\n")
    got = f.poll()
    assert [(p.step, p.loss) for p in got] == [(2, 2.0)]
    assert f.poll() == []


def test_follower_keeps_loss_of_final_record_and_restarts_on_truncation(tmp_path: Path) -> None:
    log = tmp_path / "trainer_log.jsonl"
    log.write_text(json.dumps(_record(9, loss=0.5)) + "\n" + json.dumps(_record(10, loss=None)) + "\n")
    f = TrainerLogFollower(log)
    got = f.poll()
    assert got[-1].step == 10 and got[-1].loss == 0.5
    log.write_text(json.dumps(_record(1, loss=3.0)) + "\n")  # overwrite_output_dir recreated the log
    assert [p.step for p in f.poll()] == [1]


def test_follower_deduplicates_the_steps_a_resumed_run_replays(tmp_path: Path) -> None:
    """A run killed at step 7 with its last checkpoint at 5 resumes and logs 6 and 7 again: progress (and the
    loss history built from it) must not go back, and the final record is the highest step's."""
    log = tmp_path / "trainer_log.jsonl"
    first = [_record(s, loss=3.0 - 0.1 * s) for s in range(1, 8)]
    log.write_text("".join(json.dumps(r) + "\n" for r in first))
    f = TrainerLogFollower(log)
    assert [p.step for p in f.poll()] == [1, 2, 3, 4, 5, 6, 7]
    resumed = [_record(s, loss=2.0 - 0.1 * s) for s in range(6, 11)]
    with log.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in resumed))
    steps = [p.step for p in f.poll()]
    assert steps == [7, 8, 9, 10] and steps == sorted(steps)
    assert f.last is not None and f.last.step == 10 and f.last.loss == pytest.approx(1.0)
    # a fresh reader of the whole file (the worker after a restart) sees the same monotonic sequence
    g = TrainerLogFollower(log)
    all_steps = [p.step for p in g.poll()]
    assert all_steps == sorted(all_steps) and all_steps[-1] == 10


def test_progress_status_shape() -> None:
    p = parse_record(_record(3, total=12, loss=1.25))
    assert p is not None
    status = p.to_status()
    assert status["step"] == 3 and status["totalSteps"] == 12 and status["percent"] == 25.0
    assert status["loss"] == 1.25 and status["eta"] == "0:00:09" and status["updateTime"].endswith("Z")
    assert "step 3/12 (25%) loss=1.2500" in p.line("sft")
    assert parse_record({"loss": 1.0}) is None


def _ftj(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests/examples/local-demo.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "default"}
    return doc


@pytest.fixture()
def ftj_server(emulator_server: Any) -> Any:
    """The emulator with a FineTuneJob, and the worker token bound to the job's own worker ServiceAccount (as
    the operator creates it): the reporter gets exactly what that Role grants (403 for anything else)."""
    emulator_server.apply_crd(ROOT / "crds")
    doc = _ftj("demo")
    emulator_server.create(doc, "default")
    objects, account = worker_identity(doc)
    emulator_server.enforce_rbac(objects, {"node-0-token": account})
    return emulator_server


def _env(server: Any, tmp_path: Path, name: str = "demo") -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text("node-0-token\n")
    return {
        "FT_JOB_NAME": name,
        "FT_JOB_NAMESPACE": "default",
        "FT_KUBE_API": server.url,
        "FT_KUBE_TOKEN_FILE": str(token),
        "FT_PROGRESS_INTERVAL": "3600",
    }


def test_reporter_patches_only_the_status_subresource(ftj_server: Any, tmp_path: Path) -> None:
    before = ftj_server.get("finetunejobs", "demo", "default")
    reporter = StatusReporter.from_env("sft", _env(ftj_server, tmp_path))
    assert reporter is not None
    assert reporter.report(Progress(step=4, total_steps=10, loss=1.5, epoch=0.4, eta="0:00:30"))
    obj = ftj_server.get("finetunejobs", "demo", "default")
    reported = obj["status"]["reported"]["sft"]
    assert (reported["step"], reported["totalSteps"], reported["loss"], reported["percent"]) == (4, 10, 1.5, 40.0)
    assert obj["spec"] == before["spec"]
    writes = [r for r in ftj_server.emulator.request_log if r.verb not in ("get", "list", "watch")]
    ours = [r for r in writes if r.resource == "finetunejobs" and r.verb == "patch"]
    assert ours and all(r.subresource == "status" and r.name == "demo" for r in ours)
    assert not ftj_server.emulator.authorizer.denied  # the job's worker Role grants exactly this


def test_worker_token_gets_403_outside_its_role(ftj_server: Any, tmp_path: Path) -> None:
    """The emulator enforces the chart's worker Role: reading or changing the spec is refused as on a cluster."""
    import urllib.error
    import urllib.request

    url = f"{ftj_server.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/demo"
    request = urllib.request.Request(url, headers={"Authorization": "Bearer node-0-token"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 403
    body = json.loads(caught.value.read())
    assert body["kind"] == "Status" and body["reason"] == "Forbidden"
    assert body["message"] == (
        'finetunejobs.finetune.dev "demo" is forbidden: User "system:serviceaccount:default:demo-worker" '
        'cannot get resource "finetunejobs" in API group "finetune.dev" in the namespace "default"'
    )


def test_reporter_rate_limits_and_flushes(ftj_server: Any, tmp_path: Path) -> None:
    clock = [0.0]
    env = _env(ftj_server, tmp_path)
    reporter = StatusReporter(
        env["FT_KUBE_API"],
        "default",
        "demo",
        "sft",
        token_file=env["FT_KUBE_TOKEN_FILE"],
        interval=10.0,
        clock=lambda: clock[0],
    )
    assert reporter.report(Progress(step=1, total_steps=10, loss=3.0))
    clock[0] = 5.0
    assert not reporter.report(Progress(step=2, total_steps=10, loss=2.0))  # held back
    assert ftj_server.get("finetunejobs", "demo", "default")["status"]["reported"]["sft"]["step"] == 1
    assert reporter.flush()
    assert ftj_server.get("finetunejobs", "demo", "default")["status"]["reported"]["sft"]["step"] == 2
    assert reporter.sent == 2


def test_reporter_gives_up_on_missing_object(ftj_server: Any, tmp_path: Path) -> None:
    reporter = StatusReporter.from_env("sft", _env(ftj_server, tmp_path, name="nope"))
    assert reporter is not None
    assert not reporter.report(Progress(step=1))
    n = len(ftj_server.emulator.request_log)
    assert not reporter.report(Progress(step=2), force=True)  # disabled: no further requests
    assert len(ftj_server.emulator.request_log) == n


def test_no_reporter_without_job_or_credentials(tmp_path: Path) -> None:
    assert StatusReporter.from_env("sft", {}) is None
    assert StatusReporter.from_env("sft", {"FT_JOB_NAME": "a", "FT_JOB_NAMESPACE": "b"}) is None
    env = {
        "FT_JOB_NAME": "a",
        "FT_JOB_NAMESPACE": "b",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "FT_KUBE_TOKEN_FILE": str(tmp_path / "missing"),
    }
    assert StatusReporter.from_env("sft", env) is None
    (tmp_path / "token").write_text("t")
    env["FT_KUBE_TOKEN_FILE"] = str(tmp_path / "token")
    reporter = StatusReporter.from_env("sft", env)
    assert reporter is not None
    assert reporter.url == "https://10.0.0.1:443/apis/finetune.dev/v1alpha1/namespaces/b/finetunejobs/a/status"


def test_ftctl_worker_progress_cli_reports(ftj_server: Any, tmp_path: Path) -> None:
    stage_dir = tmp_path / "sft"
    stage_dir.mkdir()
    (stage_dir / "trainer_log.jsonl").write_text(
        "".join(json.dumps(_record(s, total=5, loss=2.0 - s / 10)) + "\n" for s in range(1, 4))
    )
    env = {**_env(ftj_server, tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ftctl"),
            "worker",
            "progress",
            "--output-dir",
            str(stage_dir),
            "--stage",
            "sft",
            "--report",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[sft] step 3/5 (60%) loss=1.7000" in proc.stdout
    reported = ftj_server.get("finetunejobs", "demo", "default")["status"]["reported"]["sft"]
    assert reported["step"] == 3 and reported["loss"] == pytest.approx(1.7)


def test_a_worker_cannot_report_into_another_job(ftj_server: Any, tmp_path: Path) -> None:
    """The job's worker Role names its FineTuneJob: the same token patching another job's status gets 403."""
    ftj_server.create(_ftj("other"), "default")
    reporter = StatusReporter.from_env("sft", _env(ftj_server, tmp_path, name="other"))
    assert reporter is not None
    assert not reporter.report(Progress(step=1, total_steps=10, loss=3.0))
    assert "reported" not in (ftj_server.get("finetunejobs", "other", "default").get("status") or {})
    assert ftj_server.emulator.authorizer.denied
