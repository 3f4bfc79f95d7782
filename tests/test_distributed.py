"""Distributed training for real on CPU: torchrun with two processes, DeepSpeed ZeRO-2 and ZeRO-3 with the
renderer's DeepSpeed JSON, and two "nodes" on one machine started with exactly the environment a two-replica
PyTorchJob and a two-completion Indexed Job give their pods. Real LLaMA-Factory, real DeepSpeed (gloo)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.local.runner import free_port
from finetune_operator.worker import markers
from finetune_operator.worker.train import checkpoints, is_complete_checkpoint
from tests.install_tools import worker_identity
from tests.test_local_run import lf_env, shared_tiny_model
from tests.test_worker_resume import one_stage_job, prepare, run_until_step

ROOT = Path(__file__).resolve().parents[1]
FTCTL = str(Path(sys.executable).parent / "ftctl")

pytestmark = pytest.mark.train


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory)


def _two_nodes(argv: list[str], envs: list[dict[str, str]], tmp_path: Path) -> list[tuple[int, str]]:
    """Start one worker per environment at once (as two pods would be) and wait for both."""
    procs = []
    for i, env in enumerate(envs):
        out = (tmp_path / f"node{i}.out").open("w")
        err = (tmp_path / f"node{i}.err").open("w")
        procs.append((subprocess.Popen(argv, env=env, stdout=out, stderr=err), out, err))
    results = []
    for i, (proc, out, err) in enumerate(procs):
        try:
            code = proc.wait(timeout=600)
        finally:
            out.close()
            err.close()
        results.append((code, (tmp_path / f"node{i}.err").read_text() + (tmp_path / f"node{i}.out").read_text()))
    return results


def _ftj(server: Any, name: str) -> None:
    doc = yaml.safe_load((ROOT / "manifests/examples/local-demo.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "default"}
    server.apply_crd(ROOT / "crds")
    server.create(doc, "default")
    # Each "node" reports with its own token, as the job's own worker ServiceAccount (RBAC enforced).
    objects, account = worker_identity(doc)
    server.enforce_rbac(objects, {f"node-{i}-token": account for i in range(2)})


def _assert_only_rank0_wrote(results: list[tuple[int, str]], out: Path, backend: str, server: Any) -> None:
    for code, text in results:
        assert code == 0, text[-4000:]
    rank0, rank1 = results[0][1], results[1][1]
    marker = markers.read_marker(out)
    assert marker is not None
    assert marker["writer"]["nodeRank"] == 0 and marker["writer"]["nnodes"] == 2
    assert marker["writer"]["backend"] == backend
    assert "[sft] step 4/4" in rank0 and "[sft] step" not in rank1  # progress from rank 0 only
    assert "complete:" in rank0 and "complete:" not in rank1
    assert "2 node(s) x 1 process(es), node rank 1" in rank1
    patches = [
        (r, m)
        for r, m in zip(server.emulator.request_log, server.emulator.request_log_meta, strict=True)
        if r.verb == "patch"
    ]
    assert patches and all(r.subresource == "status" and "node-0" in m.user_agent for r, m in patches)
    reported = server.get("finetunejobs", "dist", "default")["status"]["reported"]["sft"]
    assert reported["step"] == 4 and reported["totalSteps"] == 4 and reported["loss"] is not None


def _rendered(doc: dict[str, Any], backend: str, tmp_path: Path, tiny_model: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A two-node version of ``doc`` for ``backend``: its local configs and the workload the renderer makes."""
    from finetune_operator.local.runner import LocalOptions, resolver_for
    from finetune_operator.render import RenderOptions, render
    from finetune_operator.validation import validate

    doc["spec"]["backend"] = backend
    doc["spec"]["stages"][0]["resources"] = {"nodes": 2, "gpusPerNode": 0}
    cfg, out = prepare(tmp_path, tiny_model, doc)
    job = validate(doc)
    opts = LocalOptions(workdir=tmp_path / "wd", volumes={"demo-models": str(tiny_model.parent)})
    return cfg, out, render(job, RenderOptions(resolver=resolver_for(job, opts))).step("sft").workload


def _container_env(pod_template: dict[str, Any]) -> dict[str, str]:
    container = pod_template["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _local_pod_env(
    rendered: dict[str, str], server: Any, tmp_path: Path, host: str, injected: dict[str, str]
) -> dict[str, str]:
    """The rendered container env plus what Kubernetes/the training operator inject, with the API server, HOME
    and HF_HOME pointed at test folders."""
    token = tmp_path / f"{host}.token"
    token.write_text(f"{host}-token")
    env = lf_env(**{k: v for k, v in rendered.items() if k not in ("HOME", "HF_HOME")})
    env.update(
        injected,
        HOSTNAME=host,
        FT_KUBE_API=server.url,
        FT_KUBE_TOKEN_FILE=str(token),
        FT_PROGRESS_INTERVAL="0",
        FT_JOB_NAMESPACE="default",
    )
    return env


def test_two_nodes_with_pytorchjob_environment(tiny_model: Path, tmp_path: Path, emulator_server: Any) -> None:
    _ftj(emulator_server, "dist")
    doc = one_stage_job({"max_steps": 4, "save_steps": 2}, name="dist")
    cfg, out, workload = _rendered(doc, "pytorchjob", tmp_path, tiny_model)
    assert workload["kind"] == "PyTorchJob"
    specs = workload["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in specs.values()) == 2
    port = str(free_port())
    envs = []
    for rank, role in ((0, "Master"), (1, "Worker")):
        rendered = _container_env(specs[role]["template"])
        command = specs[role]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["ftctl", "worker", "train"]
        # What the training operator injects into the pods of a PyTorchJob with Master x1 + Worker x1.
        envs.append(
            _local_pod_env(
                rendered,
                emulator_server,
                tmp_path,
                f"node-{rank}",
                {
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "WORLD_SIZE": "2",
                    "RANK": str(rank),
                    "PET_NNODES": "2",
                    "PET_NPROC_PER_NODE": "1",
                    "PET_NODE_RANK": str(rank),
                    "PET_MASTER_ADDR": "127.0.0.1",
                    "PET_MASTER_PORT": port,
                },
            )
        )
    results = _two_nodes([FTCTL, "worker", "train", "--config", str(cfg)], envs, tmp_path)
    _assert_only_rank0_wrote(results, out, "pytorchjob", emulator_server)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_two_nodes_with_indexed_job_environment(tiny_model: Path, tmp_path: Path, emulator_server: Any) -> None:
    _ftj(emulator_server, "dist")
    doc = one_stage_job({"max_steps": 4, "save_steps": 2}, name="dist")
    cfg, out, workload = _rendered(doc, "job", tmp_path, tiny_model)
    assert workload["spec"]["completionMode"] == "Indexed" and workload["spec"]["completions"] == 2
    rendered = _container_env(workload["spec"]["template"])
    master = rendered["FT_MASTER_ADDR"]  # <job>-0.<headless service>: pod 0's DNS name
    port = str(free_port())
    envs = []
    for index in (0, 1):
        # Kubernetes adds JOB_COMPLETION_INDEX; the headless Service's name resolves to pod 0, which the test
        # does with FT_HOST_ALIASES the way a pod's hostAliases would.
        envs.append(
            _local_pod_env(
                rendered,
                emulator_server,
                tmp_path,
                f"node-{index}",
                {
                    "JOB_COMPLETION_INDEX": str(index),
                    "FT_MASTER_PORT": port,
                    "FT_HOST_ALIASES": f"{master}=127.0.0.1",
                },
            )
        )
    results = _two_nodes([FTCTL, "worker", "train", "--config", str(cfg)], envs, tmp_path)
    _assert_only_rank0_wrote(results, out, "job", emulator_server)
    assert "master 127.0.0.1:" + port in results[1][1]


def test_two_nodes_with_trainjob_environment(tiny_model: Path, tmp_path: Path, emulator_server: Any) -> None:
    """Kubeflow Trainer v2: the TrainJob's trainer command and env, plus exactly the variables the
    torch-distributed runtime's torch plugin puts into each ``node`` pod (PET_NNODES = numNodes,
    PET_NPROC_PER_NODE = numProcPerNode, PET_NODE_RANK = the Job completion index, PET_MASTER_ADDR =
    ``<trainjob>-node-0-0.<trainjob>``, PET_MASTER_PORT; the port is a free one here instead of 29500, which
    another process on this machine may hold)."""
    _ftj(emulator_server, "dist")
    doc = one_stage_job({"max_steps": 4, "save_steps": 2}, name="dist")
    cfg, out, workload = _rendered(doc, "trainjob", tmp_path, tiny_model)
    assert workload["kind"] == "TrainJob"
    trainer = workload["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 1
    assert trainer["command"][:3] == ["ftctl", "worker", "train"] and trainer["command"][-1] == str(cfg)
    rendered = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
    name = workload["metadata"]["name"]
    master = f"{name}-node-0-0.{name}"  # JobSet's pod 0 behind the TrainJob's headless Service
    port = str(free_port())
    envs = []
    for index in (0, 1):
        envs.append(
            _local_pod_env(
                rendered,
                emulator_server,
                tmp_path,
                f"node-{index}",
                {
                    "JOB_COMPLETION_INDEX": str(index),
                    "PET_NNODES": str(trainer["numNodes"]),
                    "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                    "PET_NODE_RANK": str(index),
                    "PET_MASTER_ADDR": master,
                    "PET_MASTER_PORT": port,
                    "FT_HOST_ALIASES": f"{master}=127.0.0.1",
                },
            )
        )
    results = _two_nodes([FTCTL, *trainer["command"][1:]], envs, tmp_path)
    _assert_only_rank0_wrote(results, out, "trainjob", emulator_server)
    assert f"master 127.0.0.1:{port}" in results[1][1]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_two_processes_zero2_lora_through_local_runner(tiny_model: Path, tmp_path: Path) -> None:
    """``ftctl run --local --nproc 2``: torchrun with two processes (FORCE_TORCHRUN, NPROC_PER_NODE=2) and the
    renderer's ZeRO-2 config."""
    doc = one_stage_job({"max_steps": 4, "save_steps": 2}, deepspeed={"zeroStage": 2}, name="zero2")
    cfg, out = prepare(tmp_path, tiny_model, doc)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [
            FTCTL,
            "run",
            "--local",
            "-f",
            str(spec),
            "--workdir",
            str(tmp_path / "wd"),
            "--nproc",
            "2",
            "--volume",
            f"demo-models={tiny_model.parent}",
        ],
        env=lf_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = (tmp_path / "wd/.finetune/zero2/logs/sft.log").read_text()
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    ds = json.loads((cfg.parent / "ds_sft.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert "Initializing 2 distributed tasks at: 127.0.0.1:" in log  # LLaMA-Factory's launcher, via torchrun
    assert (out / "adapter_model.safetensors").is_file()
    assert [s for s, p in checkpoints(out) if is_complete_checkpoint(p)] == [2, 4]
    marker = markers.read_marker(out)
    assert marker is not None and marker["writer"]["nprocPerNode"] == 2


def test_t9k_deepspeedjob_through_deepspeed_launcher(tiny_model: Path, tmp_path: Path) -> None:
    """T9k's DeepspeedJob runs ``config.run.exec`` through DeepSpeed's launcher, which starts one process per slot
    with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*: the worker must train in that process (no second torchrun)."""
    import base64

    doc = one_stage_job({"max_steps": 4, "save_steps": 2}, deepspeed={"zeroStage": 2}, name="t9k")
    doc["spec"]["backend"] = "deepspeedjob"
    doc["spec"]["stages"][0]["resources"] = {"nodes": 1, "gpusPerNode": 2}
    from finetune_operator.local.runner import LocalOptions, resolver_for
    from finetune_operator.render import RenderOptions, render
    from finetune_operator.validation import validate

    cfg, out = prepare(tmp_path, tiny_model, doc)
    job = validate(doc)
    resolver = resolver_for(job, LocalOptions(workdir=tmp_path / "wd", volumes={"demo-models": str(tiny_model.parent)}))
    workload = render(job, RenderOptions(resolver=resolver)).step("sft").workload
    config = workload["spec"]["config"]
    assert config["localRank"] is False and config["slotsPerWorker"] == 2
    command = config["run"]["exec"]
    assert command[:3] == ["ftctl", "worker", "train"] and command[-1] == str(cfg)
    rendered = _container_env(workload["spec"]["worker"]["template"])
    env = lf_env(**{k: v for k, v in rendered.items() if k not in ("HOME", "HF_HOME", "FT_JOB_NAME")})
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    # What the launcher on the first replica runs for each host (pdsh), with exec (no python) and localRank false.
    argv = [
        sys.executable,
        "-m",
        "deepspeed.launcher.launch",
        f"--world_info={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--no_python",
        "--no_local_rank",
        FTCTL,
        *command[1:],
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert text.count("direct launch, 1 node(s) x 2 process(es)") == 2
    assert "torchrun" not in text.split("direct launch", 1)[1]  # no nested launcher
    assert "world size: 2" in text
    marker = markers.read_marker(out)
    assert marker is not None and marker["writer"]["backend"] == "deepspeedjob"
    assert text.count("complete:") == 1  # rank 0 only
    assert (out / "adapter_model.safetensors").is_file()


def test_zero3_full_interrupted_resumes_and_saves_gathered_weights(tiny_model: Path, tmp_path: Path) -> None:
    doc = one_stage_job({"max_steps": 24, "save_steps": 2}, method="full", deepspeed={"zeroStage": 3}, name="zero3")
    cfg, out = prepare(tmp_path, tiny_model, doc)
    env = lf_env(FT_PROGRESS_POLL="0.05", FT_NPROC_PER_NODE="2", FT_MASTER_PORT=str(free_port()))
    argv = [FTCTL, "worker", "train", "--config", str(cfg), "--backend", "local"]
    code, err = run_until_step(argv, env, 3, tmp_path / "first.log")
    assert code == 128 + signal.SIGTERM, err + (tmp_path / "first.log").read_text()[-3000:]
    complete = [p for _, p in checkpoints(out) if is_complete_checkpoint(p)]
    assert complete, "no complete checkpoint before the interruption"
    last = complete[-1]
    # A ZeRO-3 checkpoint is sharded: one partition of parameters/optimizer state per rank.
    shards = sorted(p.name for p in last.glob("global_step*/*"))
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards), shards
    resume_from = int(last.name.split("-")[1])
    logged = len((out / "trainer_log.jsonl").read_text().splitlines())

    env["FT_MASTER_PORT"] = str(free_port())
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert second.returncode == 0, second.stderr[-4000:] + second.stdout[-4000:]
    steps = [json.loads(x)["current_steps"] for x in (out / "trainer_log.jsonl").read_text().splitlines()[logged:]]
    assert steps[0] == resume_from + 1
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 24

    # stage3_gather_16bit_weights_on_model_save: the final weights are a whole model, loadable as such.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert sum(p.numel() for p in model.parameters()) > 100_000
    # ...and the merge/export path accepts them (a full model: exported as is).
    merge_cfg = tmp_path / "merge.yaml"
    merge_cfg.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(out),
                "template": "qwen",
                "finetuning_type": "full",
                "export_dir": str(tmp_path / "exported"),
                "export_size": 1,
                "export_device": "cpu",
                "export_legacy_format": False,
            }
        )
    )
    merged = subprocess.run(
        [FTCTL, "worker", "merge", "--config", str(merge_cfg)],
        env=lf_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert merged.returncode == 0, merged.stderr[-4000:]
    assert markers.read_marker(tmp_path / "exported") is not None
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
