"""Run one container process of a pod in its image with ``buildah run`` (vfs storage, chroot isolation).

Working containers are shared: ``buildah from IMAGE`` copies the whole image with the vfs driver (seconds for
the operator image, tens of seconds for the worker image), so the agent makes one working container per image
and runs every pod's process in it. What a pod writes outside its volumes therefore lands in that shared
root filesystem; the rendered pods write only to their volumes and emptyDirs (``/tmp``, ``HF_HOME``,
``/dev/shm``), which are per pod (the trade-off is described in tests/node_agent/README.md).

``buildah run`` reports a child killed by a signal as exit status 1 and says which signal on stderr
("subprocess exited on killed"); :func:`exit_code` turns that into the 128+N a kubelet reports.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV = {"STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}

#: Signal names as buildah's chroot runtime prints them (Go's syscall.Signal strings).
_SIGNALS = {
    "killed": signal.SIGKILL,
    "terminated": signal.SIGTERM,
    "interrupt": signal.SIGINT,
    "aborted": signal.SIGABRT,
    "segmentation fault": signal.SIGSEGV,
    "hangup": signal.SIGHUP,
}
_EXITED_ON = re.compile(r"subprocess exited on ([a-z ]+)")


def available() -> str | None:
    """Why containers cannot run here, or None when they can (root and buildah are needed)."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (scripts/build-images.sh installs it)"
    if os.geteuid() != 0:
        return "buildah with chroot isolation needs root"
    return None


def _buildah(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", *args], env={**os.environ, **ENV}, capture_output=True, text=True, check=check, timeout=timeout
    )


def image_exists(image: str) -> bool:
    return _buildah("inspect", "--type", "image", image, check=False).returncode == 0


def image_config(image: str) -> dict[str, object]:
    """Entrypoint, Cmd, User, WorkingDir and Env of an image (what a kubelet takes when the pod says nothing)."""
    import json

    out = _buildah("inspect", "--type", "image", image).stdout
    return dict(json.loads(out)["OCIv1"].get("config") or {})


def exit_code(returncode: int, stderr_tail: str) -> int:
    """The container's exit code as a kubelet reports it (128+N for a signal)."""
    matches = list(_EXITED_ON.finditer(stderr_tail))
    match = matches[-1] if matches else None
    if returncode != 0 and match is not None:
        name = match.group(1).strip()
        if name in _SIGNALS:
            return 128 + int(_SIGNALS[name])
    return returncode


def _in_rootfs(path: str) -> str:
    """A mount target with Debian's ``/var/run -> /run`` link resolved (a kubelet resolves links inside the
    container's root; buildah's chroot mounts a fresh /run over a target reached through the link)."""
    return "/run/" + path[len("/var/run/") :] if path.startswith("/var/run/") else path


@dataclass
class Mount:
    host: str
    container: str
    read_only: bool = False


@dataclass
class Process:
    """A started ``buildah run``; ``wait()`` returns the kubelet-style exit code."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def wait(self, timeout: float | None = None) -> int:
        # Like a kubelet tearing the container down: whatever the main process left running dies with it
        # (collected first: once buildah exits, orphans are re-parented and lost from view).
        descendants = self._descendants()
        rc = self.popen.wait(timeout)
        self._kill_all(descendants + self._descendants(), signal.SIGKILL)
        tail = self.log_path.read_bytes()[-4000:].decode(errors="replace")
        return exit_code(rc, tail)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the container (also those in sessions of their own, as a cgroup would)."""
        self._kill_all(self._descendants(), sig)

    def _kill_all(self, pids: list[int], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def running(self) -> bool:
        return self.popen.poll() is None

    def _descendants(self) -> list[int]:
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
        children: dict[int, list[int]] = {}
        for line in out.splitlines():
            pid, ppid = (int(x) for x in line.split())
            children.setdefault(ppid, []).append(pid)
        found, todo = [], [self.popen.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def inner_pids(self) -> list[int]:
        """PIDs of the container's processes (below buildah's chroot helpers), oldest first."""
        pids = self._descendants()
        if not pids:
            return []
        out = subprocess.run(
            ["ps", "-o", "pid=,cmd=", "-p", ",".join(map(str, pids))], capture_output=True, text=True
        ).stdout
        inner = []
        for line in out.splitlines():
            pid, _, cmd = line.strip().partition(" ")
            if not cmd.startswith("buildah"):
                inner.append(int(pid))
        return sorted(inner)


class Containers:
    """One working container per image, created on first use and removed by :meth:`close`."""

    def __init__(self, prefix: str = "ft-node") -> None:
        self.prefix = prefix
        self._by_image: dict[str, str] = {}
        self._lock = threading.Lock()

    def container_for(self, image: str) -> str:
        with self._lock:
            if image not in self._by_image:
                if not image_exists(image):
                    raise LookupError(f"image {image} is not built (scripts/build-images.sh)")
                name = f"{self.prefix}-{len(self._by_image)}-{os.getpid()}"
                _buildah("rm", name, check=False)
                _buildah("from", "--pull-never", "--name", name, image)
                self._by_image[image] = name
            return self._by_image[image]

    def run(
        self,
        image: str,
        argv: Sequence[str],
        *,
        user: str | None,
        workdir: str | None,
        env: Mapping[str, str],
        mounts: Sequence[Mount],
        hostname: str,
        log_path: Path,
    ) -> Process:
        ctr = self.container_for(image)
        # --no-hosts: buildah's generated /etc/hosts is shared by concurrent runs in one working container and
        # would hide the pod's own (mounted below).
        args = ["buildah", "run", "--no-hosts", "--hostname", hostname]
        if user:
            args += ["--user", user]
        if workdir:
            args += ["--workingdir", workdir]
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        for m in mounts:
            args += ["-v", f"{m.host}:{_in_rootfs(m.container)}:{'ro' if m.read_only else 'rw'}"]
        args += [ctr, "--", *argv]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **ENV},
                start_new_session=True,
            )
        return Process(popen, log_path, list(argv))

    def close(self) -> None:
        with self._lock:
            for name in self._by_image.values():
                _buildah("rm", name, check=False)
            self._by_image.clear()
