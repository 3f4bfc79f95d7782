"""Hand-off latency: from the merge finishing to the first successful chat completion, locally, with real vLLM.

What users wait for between "the pipeline wrote the model" and "the endpoint answers". Measured on the demo
pipeline of ``manifests/examples/local-demo-serve.yaml`` (tiny model, SFT -> DPO -> merge on CPU):

1. the pipeline runs with ``run_local`` (the worker code ``ftctl run --local`` uses); the clock starts when it
   returns, i.e. when the merge step has written ``merged/`` and its completion marker;
2. the vLLM command is built exactly as for the Deployment (``build_local_command``), vLLM is started,
   ``/health`` is polled, then one chat completion is sent to the served model name;
3. the clock stops when that completion returns 200 with a reply from the merged model.

Printed: the split (command built, process started, ``/health`` 200, first completion) and the total, per run
and as a median. vLLM is started ``--runs`` times against the same merged model (the pipeline runs once), so
the later runs measure a warm page cache, like a Deployment rolling to a new model on the same node.

Usage: ``python bench/vllm_handoff.py [--runs 3] [--workdir DIR] [--vllm "CMD"]``; ``--vllm`` defaults to the
``vllm`` console script of ``FT_VLLM_PYTHON``'s environment or of ``.venv-vllm`` (``scripts/install-vllm.sh``).
The numbers depend on the machine (and on its load: run it on an idle one); record them with its description.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from finetune_operator.api.types import FineTuneJob
from finetune_operator.local import serve as ls
from finetune_operator.local.demo import prepare_demo
from finetune_operator.local.runner import LocalOptions, resolver_for, run_local

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "manifests" / "examples" / "local-demo-serve.yaml"


def default_vllm_cmd() -> str:
    configured = os.environ.get("FT_VLLM_PYTHON")
    py = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    if not py.is_file():
        sys.exit("no vLLM environment: run scripts/install-vllm.sh or pass --vllm / set FT_VLLM_PYTHON")
    return f"{py.parent / 'vllm'} serve"


def one_handoff(
    job: FineTuneJob, opts: LocalOptions, outputs: dict[str, object], vllm_cmd: str, log: Path
) -> dict[str, float]:
    """Start vLLM on the merged model and time each phase until the first completion (seconds)."""
    t0 = time.monotonic()
    cmd = ls.build_local_command(job, resolver_for(job, opts), vllm_cmd)
    assert cmd.vllm is not None
    ls.check_artefacts(cmd.vllm, outputs)
    t_built = time.monotonic()
    with ls.VllmProcess(cmd, log_path=log) as server:
        t_started = time.monotonic()
        server.wait_healthy(ls.DEFAULT_START_TIMEOUT_S, interval=0.1)
        t_healthy = time.monotonic()
        reply = ls.chat(cmd.base_url, cmd.served_models[0], max_tokens=8)
        t_reply = time.monotonic()
    return {
        "build": t_built - t0,
        "spawn": t_started - t_built,
        "health": t_healthy - t_started,
        "first_completion": t_reply - t_healthy,
        "total": t_reply - t0,
        "reply_chars": float(len(reply)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="vLLM starts to time (default 3)")
    parser.add_argument("--workdir", type=Path, help="keep the pipeline's files here (default: a temporary dir)")
    parser.add_argument("--vllm", help="command that starts vLLM (default: .venv-vllm's `vllm serve`)")
    args = parser.parse_args(argv)
    vllm_cmd = args.vllm or default_vllm_cmd()
    console = Console(stderr=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-handoff-"))
    prepare_demo(workdir)
    job = FineTuneJob.model_validate(yaml.safe_load(SPEC.read_text(encoding="utf-8")))
    opts = LocalOptions(workdir=workdir, environ={**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"})
    t = time.monotonic()
    result = run_local(job, opts, console)
    console.print(
        f"pipeline (SFT -> DPO -> merge): {time.monotonic() - t:.1f} s; merged model "
        f"{result.outputs.get('mergedModel')}"
    )

    runs = []
    for i in range(args.runs):
        r = one_handoff(job, opts, result.outputs, vllm_cmd, workdir / f"vllm-{i}.log")
        runs.append(r)
        print(
            f"run {i + 1}: build {r['build'] * 1000:.0f} ms, spawn {r['spawn'] * 1000:.0f} ms, "
            f"/health after {r['health']:.1f} s, first completion {r['first_completion'] * 1000:.0f} ms, "
            f"total {r['total']:.1f} s",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; vLLM: {vllm_cmd}"
    )
    print(
        f"merge finished -> first chat completion: median {med['total']:.1f} s over {len(runs)} runs "
        f"(first run {runs[0]['total']:.1f} s; /health {med['health']:.1f} s, "
        f"completion {med['first_completion'] * 1000:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
