"""The bundled demo: a tiny model, tiny datasets and a FineTuneJob that uses them, laid out in a workdir.

``python -m finetune_operator.local.demo --workdir DIR`` only prepares the files; ``ftctl run --local --demo
--workdir DIR`` prepares them and runs the job. The layout is exactly what ``ftctl run --local`` expects for the
spec's claims (``<workdir>/<claimName>/<subPath>``), so the same spec also works on a cluster whose
PersistentVolumeClaims hold the same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

#: The packaged copy of ``manifests/examples/local-demo.yaml`` (a test keeps both identical).
DEMO_SPEC_RESOURCE = "demo-job.yaml"
MODEL_CLAIM = "demo-models"
MODEL_SUBPATH = "tiny-qwen2"
DATA_CLAIM = "demo-data"


def demo_spec_text() -> str:
    """The demo FineTuneJob as YAML text."""
    return resources.files("finetune_operator.local").joinpath(DEMO_SPEC_RESOURCE).read_text(encoding="utf-8")


def demo_spec() -> dict[str, Any]:
    """The demo FineTuneJob as a dict."""
    data = yaml.safe_load(demo_spec_text())
    assert isinstance(data, dict)
    return data


def ensure_tiny_model(model_dir: Path, seed: int = 0) -> Path:
    """Build the tiny model into ``model_dir`` unless it is already there.

    Built in a sibling temporary directory and renamed into place, so an interrupted build never leaves a
    half-written model that a later run would mistake for a complete one.
    """
    from finetune_operator.local.tinymodel import build_tiny_model

    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        build_tiny_model(tmp, seed=seed)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def prepare_demo(workdir: str | Path) -> Path:
    """Create the tiny model, the datasets and ``<workdir>/local-demo.yaml``; return the spec's path."""
    from finetune_operator.local.tinymodel import build_demo_data

    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    ensure_tiny_model(root / MODEL_CLAIM / MODEL_SUBPATH)
    build_demo_data(root / DATA_CLAIM)
    spec_path = root / "local-demo.yaml"
    spec_path.write_text(demo_spec_text(), encoding="utf-8")
    return spec_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.local.demo", description=__doc__)
    parser.add_argument("--workdir", default="demo-workdir", help="where to create the demo files")
    args = parser.parse_args(argv)
    spec = prepare_demo(args.workdir)
    print(f"demo model, data and spec are in {spec.parent}")
    print(f"run it with: ftctl run --local -f {spec} --workdir {spec.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
