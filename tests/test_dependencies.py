"""Every third-party package the product imports is declared, pinned, in pyproject.toml.

An undeclared import works on a developer's machine (something else pulled the package in) and breaks in the
operator image or a fresh install; a dependency nobody imports is memory and attack surface for nothing (kopf
imports any Kubernetes client library it finds installed). Checked statically: every ``import`` statement of
``operator/finetune_operator`` (function-level ones included), mapped to its distribution.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "operator" / "finetune_operator"

#: Imported but installed outside pyproject on purpose, with where it is pinned instead.
ELSEWHERE = {
    "llamafactory": "installed with --no-deps, pinned in scripts/test.sh and images/Dockerfile",
    "modelscope": "GPU worker image only (images/Dockerfile pins it): spec.model.hub modelscope downloads",
    "vllm": "runs in its own environment (images, FT_VLLM_PYTHON), never imported by the package",
    "boto3": "installed with --no-deps (botocore's python-dateutil pin), pinned in scripts/setup.sh and the Dockerfile",
    "botocore": "installed with --no-deps together with boto3 (see boto3)",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Distribution -> where declared (``dependencies`` or the extra's name)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for where, reqs in [("dependencies", project["dependencies"]), *project["optional-dependencies"].items()]:
        for req in reqs:
            out.setdefault(normalise(re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0]), where)
    return out


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files importing it (third-party only)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "finetune_operator" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared() -> None:
    dists = importlib.metadata.packages_distributions()
    pins = declared()
    missing = []
    for module, files in sorted(imported_modules().items()):
        if module in ELSEWHERE:
            continue
        candidates = [normalise(d) for d in dists.get(module, [module])]
        if not any(c in pins for c in candidates):
            missing.append(f"{module} (distribution {', '.join(candidates)}) imported by {', '.join(sorted(files))}")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_one_kubernetes_client_stack() -> None:
    """The sync ``kubernetes`` client is no runtime dependency (kopf imports any client library it finds
    installed), nothing in the package imports it, and the operator's own client imports no generated client
    (kopf's credentials over aiohttp; ``kubernetes_asyncio`` only lends its kubeconfig loader)."""
    assert declared().get("kubernetes") != "dependencies"
    assert "kubernetes" not in imported_modules()
    controller = {m for m, files in imported_modules().items() if any("/controller/" in f for f in files)}
    assert "kubernetes_asyncio" not in controller
