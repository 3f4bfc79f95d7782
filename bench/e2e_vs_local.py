"""The `job`-backend pipeline in containers vs ``ftctl run --local`` on the same spec, in one run.

Both sides run the tiny-model pipeline of tests/test_e2e.py (SFT 6 steps → DPO 2 steps → merge) from the
same model and datasets:

* ``e2e``: ``kubectl apply -f`` against the API-server emulator; the operator creates one Job per step and the
  node agent (tests/node_agent) runs each pod in the worker image with ``buildah run`` (images from
  scripts/build-images.sh). Timed from the apply to the FineTuneJob's merge step ``Succeeded``; serving
  (vLLM container until ``Ready``) is reported apart, since ``ftctl run --local --no-serve`` does not serve.
* ``local``: ``ftctl run --local --no-serve -f <the same spec>``.

The image start-up share: the median cost of an empty ``buildah run`` in the worker image (measured here)
times the number of containers the pipeline ran, over the e2e wall time. Target: ratio <= 1.3.

Needs root, buildah and the images. Usage: ``python bench/e2e_vs_local.py [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import e2e_harness as h  # noqa: E402
from tests.node_agent.buildah import ENV  # noqa: E402

from finetune_operator.local import demo  # noqa: E402
from finetune_operator.local.tinymodel import build_demo_data  # noqa: E402

TARGET = 1.3
TOKEN = "hf_bench-token"


def pipeline_spec() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests/examples/local-demo-serve.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": "bench", "namespace": h.NS}
    s = doc["spec"]
    s["backend"] = "job"
    s["model"]["volume"] = {"claimName": "models", "subPath": demo.MODEL_SUBPATH}
    for stage in s["stages"]:
        stage["resources"] = {"nodes": 1, "gpusPerNode": 0}
    s["stages"][0]["args"].update(max_steps=6, save_steps=2)
    s["stages"][1]["args"].update(max_steps=2, save_steps=2)
    return dict(doc)


def run_local(work: Path, model: Path, doc: dict[str, Any]) -> float:
    wd = work / "local"
    shutil.copytree(model, wd / "models" / demo.MODEL_SUBPATH)
    build_demo_data(wd / "demo-data")
    spec = wd / "job.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "ftctl"),
            "run",
            "--local",
            "--no-serve",
            "-f",
            str(spec),
            "--workdir",
            str(wd),
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=3600,
    )
    return time.perf_counter() - start


def empty_run_seconds(image: str, runs: int = 3) -> float:
    env = {**os.environ, **ENV}
    ctr = subprocess.run(
        ["buildah", "from", "--pull-never", image], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(["buildah", "run", ctr, "--", "true"], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        subprocess.run(["buildah", "rm", ctr], env=env, capture_output=True, check=False)


def run_e2e(work: Path, model: Path, doc: dict[str, Any]) -> tuple[float, float, int]:
    root = work / "e2e"
    root.mkdir()
    with h.cluster(root, model, TOKEN) as c:
        shutil.copytree(model, c.claim("models") / demo.MODEL_SUBPATH)
        path = root / "job.yaml"
        path.write_text(yaml.safe_dump(doc))
        start = time.perf_counter()
        c.kubectl("apply", "-f", str(path))

        def merged() -> bool:
            stages = c.status("bench").get("stages") or []
            return any(s.get("name") == "merge" and s.get("state") == "Succeeded" for s in stages)

        c.server.wait_for(merged, 3600, "the merge step never succeeded")
        trained = time.perf_counter() - start
        c.kubectl("wait", "--for=condition=Ready", "ftj/bench", "--timeout=1200s", timeout=1300)
        served = time.perf_counter() - start - trained
        containers = len([r for r in c.agent.records if not r.pod.startswith("bench-serve")])
    return trained, served, containers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the runs' files here (default: a temporary folder)")
    args = parser.parse_args()
    build = h.build_images("worker", "vllm")
    if build.returncode != 0:
        print(build.stderr[-4000:], file=sys.stderr)
        return 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    model = demo.ensure_tiny_model(work / "model" / demo.MODEL_SUBPATH)
    doc = pipeline_spec()
    local = run_local(work, model, doc)
    trained, served, containers = run_e2e(work, model, doc)
    start_up = empty_run_seconds(h.WORKER_IMAGE) * containers
    ratio = trained / local
    print(f"local (ftctl run --local --no-serve): {local:.1f} s")
    print(f"e2e job backend until merged:        {trained:.1f} s  ({containers} containers)")
    print(f"  image start-up share:              {start_up:.1f} s ({100 * start_up / trained:.0f} %)")
    print(f"  then serving until Ready:          {served:.1f} s")
    print(f"ratio e2e/local: {ratio:.2f} (target <= {TARGET})")
    return 0 if ratio <= TARGET else 2


if __name__ == "__main__":
    raise SystemExit(main())
