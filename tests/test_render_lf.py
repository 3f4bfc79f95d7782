"""Every LLaMA-Factory config the renderer writes for the examples is accepted by real LLaMA-Factory.

Training configs go through ``llamafactory.hparams.get_train_args`` and the merge config through
``get_infer_args`` (the parsers ``llamafactory-cli train``/``export`` run first): unknown keys, invalid
combinations (adapters on a full stage, ``create_new_adapter`` on a quantized model, ...) and DeepSpeed JSON
that the HF Trainer cannot reconcile with the arguments all fail there. They load no model and need no data.

How it runs:

* One subprocess for the whole session: importing llamafactory takes several seconds, and
  ``get_train_args`` with a ``deepspeed`` config initialises ``torch.distributed`` (process-global state the
  rest of the test session must not inherit). The subprocess sees the environment of a one-process torchrun
  (``LOCAL_RANK``/``RANK``/``WORLD_SIZE``/``MASTER_*``), because LLaMA-Factory refuses DeepSpeed outside a
  distributed launch ("Please use FORCE_TORCHRUN=1").
* ``bf16``/``fp16``/``pure_bf16`` are switched off before parsing: they describe the *device* (LLaMA-Factory
  refuses bf16 on a CPU at argument-parsing time), not whether the config is well-formed; every other key is
  checked exactly as rendered.
* DeepSpeed's CPU shared-memory collective op is not JIT-compiled in that subprocess (see ``_CHECKER``).
* Paths point at a temporary folder (``PathResolver``), with the generated files written into the config
  dir; the DeepSpeed JSON must exist because the HF Trainer reads it while parsing. Model and data paths need
  not exist: the parsers do not open them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.render import PathResolver, config_files
from finetune_operator.validation import load_documents, validate

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("[0-9][0-9]-*.yaml"))
DEVICE_KEYS = ("bf16", "fp16", "pure_bf16")

#: (id, parser, example, file) for every LLaMA-Factory config of every example, known at collection time.
CASES: list[tuple[str, str, Path, str]] = []
for _path in EXAMPLES:
    for _name in config_files(validate(load_documents(_path)[0])):
        if _name.endswith(".yaml") and _name != "download.yaml":
            CASES.append((f"{_path.stem}:{_name}", "infer" if _name == "merge.yaml" else "train", _path, _name))

#: A config LLaMA-Factory must reject: proves the harness really parses (a misspelt key).
CANARY = "canary:misspelt-key"

_CHECKER = r"""
import importlib, json, sys
# DeepSpeed JIT-compiles a shared-memory all-reduce op (g++, up to minutes, re-done when another process built
# it with other flags) the first time a CPU process group starts. It only speeds up CPU collectives, which
# argument parsing never runs: skip it here.
# (deepspeed.comm re-exports the torch *library* as ``torch``: patch the submodule itself.)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams import get_infer_args, get_train_args
for line in sys.stdin:
    case = json.loads(line)
    try:
        if case["parser"] == "datasets":
            attrs = get_dataset_list(case["names"], case["dataset_dir"])
            result = {"id": case["id"], "ok": True, "attrs": [dict(vars(a)) for a in attrs]}
        else:
            (get_infer_args if case["parser"] == "infer" else get_train_args)(case["config"])
            result = {"id": case["id"], "ok": True}
    except BaseException as exc:  # LF raises ValueError, HfArgumentParser may sys.exit
        result = {"id": case["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def lf_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    pytest.importorskip("llamafactory")
    root = tmp_path_factory.mktemp("lfargs")
    lines = []
    for ident, parser, path, name in CASES:
        res = PathResolver(volume_root=str(root / path.stem / "vol"), config_dir=str(root / path.stem / "cfg"))
        files = config_files(validate(load_documents(path)[0]), res)
        cfg_dir = Path(res.config_dir)
        cfg_dir.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (cfg_dir / fname).write_text(text, encoding="utf-8")
        config = yaml.safe_load(files[name])
        for key in DEVICE_KEYS:
            if key in config:
                config[key] = False
        lines.append(json.dumps({"id": ident, "parser": parser, "config": config}))
        if name == next(c[3] for c in CASES if c[2] == path):  # once per example: its dataset_info.json
            names = [d.name for d in validate(load_documents(path)[0]).spec.datasets]
            lines.append(
                json.dumps(
                    {"id": f"{path.stem}:datasets", "parser": "datasets", "names": names, "dataset_dir": str(cfg_dir)}
                )
            )
        if ident == CASES[0][0]:
            bad = dict(config, lora_rnak=8)
            lines.append(json.dumps({"id": CANARY, "parser": "train", "config": bad}))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "LOCAL_RANK": "0",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHECKER],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=root,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            results[r["id"]] = r
    assert len(results) == len(lines), f"checker crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return results


@pytest.mark.parametrize(("ident", "parser", "path", "name"), CASES, ids=[c[0] for c in CASES])
def test_llamafactory_accepts_rendered_config(
    lf_results: dict[str, dict[str, Any]], ident: str, parser: str, path: Path, name: str
) -> None:
    result = lf_results[ident]
    assert result["ok"], f"LLaMA-Factory ({parser}) rejected {name} of {path.name}: {result.get('error')}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_llamafactory_reads_dataset_info(lf_results: dict[str, dict[str, Any]], path: Path) -> None:
    """LLaMA-Factory's own dataset_info parser sees every dataset with the spec's formatting, columns and tags,
    and its loader's os.path.join(dataset_dir, file_name) resolves to the absolute file on the volume."""
    result = lf_results[f"{path.stem}:datasets"]
    assert result["ok"], result.get("error")
    job = validate(load_documents(path)[0])
    attrs = {a["dataset_name"]: a for a in result["attrs"]}
    assert len(attrs) == len(job.spec.datasets)
    for ds in job.spec.datasets:
        (file_name,) = [n for n in attrs if n.endswith(ds.volume.sub_path or "")]
        attr = attrs[file_name]
        assert attr["load_from"] == "file"
        assert os.path.isabs(file_name) and os.path.join("/any/dataset_dir", file_name) == file_name
        assert attr["formatting"] == ds.formatting
        assert attr["ranking"] is ds.ranking
        for key, value in (ds.columns.model_dump(exclude_none=True) if ds.columns else {}).items():
            assert attr[key] == value, key
        for key, value in (ds.tags.model_dump(exclude_none=True) if ds.tags else {}).items():
            assert attr[key] == value, key


def test_llamafactory_rejects_the_canary(lf_results: dict[str, dict[str, Any]]) -> None:
    result = lf_results[CANARY]
    assert not result["ok"]
    assert "lora_rnak" in result["error"]


def test_every_kind_of_config_is_covered() -> None:
    """The examples exercise each path through the parsers: LoRA, QLoRA, full+ZeRO-3, stacked DPO, export."""
    names = {c[0] for c in CASES}
    assert any(n.endswith("merge.yaml") for n in names)
    assert any(n.endswith("dpo.yaml") for n in names)
    assert len(CASES) >= 10
