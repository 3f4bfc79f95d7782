"""Overhead of ``ftctl run --local`` over raw ``llamafactory-cli`` on the same generated configs.

Both sides run the bundled demo pipeline (SFT on sharegpt + alpaca data -> DPO on top -> merge) on the tiny
model, on CPU, from a fresh output folder each time:

* ``ftctl``: ``ftctl run --local -f local-demo.yaml`` (validation, config generation, the worker's checks,
  resume logic, progress following, markers, atomic merge);
* ``raw``: ``llamafactory-cli train sft.yaml``, ``train dpo.yaml``, ``export merge.yaml`` with the very configs
  ``ftctl`` generated (output folders pointed elsewhere).

Runs alternate (ftctl, raw, ftctl, raw, ...) so that machine load drifts hit both sides alike; the ratio of the
medians is printed. Target: <= 1.05. Usage: ``python bench/local_vs_raw.py [--runs 3] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
TARGET = 1.05


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(argv: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(argv, env=_env(), stdout=fh, stderr=subprocess.STDOUT, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with {proc.returncode}; see {log}")
    return took


def _raw_configs(cfg_dir: Path, out_root: Path, dest: Path) -> list[tuple[str, Path]]:
    """Copies of the generated sft/dpo/merge configs with outputs (and the chain) under ``out_root``."""
    dest.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, Path]] = []
    for name, sub in (("sft", "train"), ("dpo", "train"), ("merge", "export")):
        cfg = yaml.safe_load((cfg_dir / f"{name}.yaml").read_text())
        for key in ("output_dir", "export_dir", "adapter_name_or_path"):
            if key in cfg:
                cfg[key] = ",".join(str(out_root / Path(p).name) for p in str(cfg[key]).split(","))
        path = dest / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        steps.append((sub, path))
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    from finetune_operator.local.demo import MODEL_CLAIM, prepare_demo

    root = args.workdir or Path(tempfile.mkdtemp(prefix="ft-bench-"))
    spec = prepare_demo(root / "demo")
    model_root = root / "demo" / MODEL_CLAIM
    ftctl_times: list[float] = []
    raw_times: list[float] = []
    for i in range(args.runs):
        wd = root / f"ftctl-{i}"
        shutil.rmtree(wd, ignore_errors=True)
        shutil.copytree(root / "demo" / "demo-data", wd / "demo-data")
        t = _run(
            [
                str(BIN / "ftctl"),
                "run",
                "--local",
                "-f",
                str(spec),
                "--workdir",
                str(wd),
                "--volume",
                f"{MODEL_CLAIM}={model_root}",
            ],
            root / f"ftctl-{i}.log",
        )
        ftctl_times.append(t)
        raw_out = root / f"raw-{i}"
        shutil.rmtree(raw_out, ignore_errors=True)
        steps = _raw_configs(wd / ".finetune" / "local-demo" / "config", raw_out, raw_out / "config")
        start = time.perf_counter()
        for sub, cfg in steps:
            _run([str(BIN / "llamafactory-cli"), sub, str(cfg)], root / f"raw-{i}-{cfg.stem}.log")
        raw_times.append(time.perf_counter() - start)
        print(f"run {i + 1}/{args.runs}: ftctl {t:6.1f} s   raw {raw_times[-1]:6.1f} s", flush=True)
    f, r = statistics.median(ftctl_times), statistics.median(raw_times)
    ratio = f / r
    print(f"median: ftctl {f:.1f} s, raw llamafactory-cli {r:.1f} s, ratio {ratio:.3f} (target <= {TARGET})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
