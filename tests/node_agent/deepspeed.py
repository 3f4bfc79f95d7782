"""T9k's DeepSpeedJob controller, played for real: sshd in every worker, DeepSpeed's launcher over SSH.

What T9k does for a ``batch.tensorstack.dev/v1beta1`` DeepSpeedJob, as far as the pods can tell:

* one SSH key pair per job; every worker pod ``<job>-worker-<i>`` runs ``sshd`` (from the worker image:
  images/Dockerfile installs openssh-server and pdsh) accepting that key for root;
* a launcher runs ``deepspeed --hostfile <hosts> [--no_local_rank] --no_python <config.run.exec>``: DeepSpeed's
  multi-node runner reaches every host over pdsh/ssh and starts ``slotsPerWorker`` processes on each, with
  RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; the pod's environment travels through
  ``~/.deepspeed_env`` (written for the launcher, read by DeepSpeed's runner);
* ``status.phase``: Running, then Succeeded when the launcher exits 0, else Failed (with a ``Failed``
  condition); T9k's pause mode (``spec.runMode.pause.enabled``) is waited out before starting.

Differences forced by one shared network (tests/node_agent/README.md): every sshd listens on its own port
(2222 + a per-agent offset + index) and the launcher's ``~/.ssh/config`` maps each worker's DNS name to
127.0.0.1 and that port; the launcher is a separate pod (``<job>-launcher``) from the worker template.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.node_agent.buildah import image_config
from tests.node_agent.controllers import Controller, Result, condition, now
from tests.node_agent.pods import Pod

SSH_DIR = "/etc/t9k-ssh"
MASTER_PORT = 29500


def _free_port_block(n: int) -> int:
    """A base port with ``n`` free ports above it (checked now; good enough on a test machine)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        free = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("0.0.0.0", p))
                except OSError:
                    free = False
                    break
        if free:
            return base
    raise RuntimeError("no block of free ports")


def _wait_port(port: int, alive: Any, timeout: float = 120) -> bool:
    """Wait until something accepts on ``port`` (sshd is up), as T9k waits for its workers to be ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


class DeepSpeedJobController(Controller):
    kind = "DeepSpeedJob"

    def _keys(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("id_ed25519", "host_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"t9k-{self.name}", "-f", str(folder / name)],
                check=True,
                capture_output=True,
            )
        (folder / "authorized_keys").write_text((folder / "id_ed25519.pub").read_text())

    def run(self) -> None:
        obj = self.wait(lambda o: not (((o.get("spec") or {}).get("runMode") or {}).get("pause") or {}).get("enabled"))
        if obj is None:
            return
        spec = obj["spec"]
        config = spec.get("config") or {}
        replicas = int(spec["worker"].get("replicas", 1))
        slots = int(config.get("slotsPerWorker", 1))
        exec_argv = list((config.get("run") or {}).get("exec") or [])
        template = spec["worker"]["template"]
        backoff = int((spec.get("runPolicy") or {}).get("backoffLimit", 0) or 0)
        hosts = [f"{self.name}-worker-{i}" for i in range(replicas)]
        attempts = 0
        while True:
            code, message = self._attempt(template, hosts, slots, exec_argv, config)
            if self.current() is None:
                return
            if code == 0:
                self.patch_status(
                    {
                        "phase": "Succeeded",
                        "completionTime": now(),
                        "conditions": [condition("Completed", "DeepSpeedJobSucceeded", "")],
                    }
                )
                return
            attempts += 1
            if code <= 127 or attempts > backoff:  # restartPolicy ExitCode: only signals are retried
                self.patch_status(
                    {
                        "phase": "Failed",
                        "completionTime": now(),
                        "conditions": [condition("Failed", "DeepSpeedJobFailed", message)],
                    }
                )
                return

    def _attempt(
        self, template: dict[str, Any], hosts: list[str], slots: int, exec_argv: list[str], config: dict[str, Any]
    ) -> Result:
        ssh = Path(tempfile.mkdtemp(prefix=f"ssh-{self.name}-", dir=self.agent.root))
        self._keys(ssh)
        base = _free_port_block(len(hosts))
        ports = {h: base + i for i, h in enumerate(hosts)}
        (ssh / "hostfile").write_text("".join(f"{h} slots={slots}\n" for h in hosts))
        (ssh / "config").write_text(
            "".join(
                f"Host {h}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n  IdentityFile {SSH_DIR}/id_ed25519\n"
                "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
                for h, p in ports.items()
            )
        )
        for p in ssh.iterdir():
            os.chmod(p, 0o600 if p.name in ("id_ed25519", "host_key") else 0o644)
        os.chmod(ssh, 0o700)
        self.patch_status(
            {"phase": "Running", "startTime": now(), "conditions": [condition("Running", "DeepSpeedJobRunning", "")]}
        )
        volumes = [*list(template["spec"].get("volumes") or []), {"name": "t9k-ssh", "hostPath": {"path": str(ssh)}}]
        workers: list[Any] = []
        for h, port in ports.items():
            tpl = _with(
                template,
                volumes,
                [
                    "/usr/sbin/sshd",
                    "-D",
                    "-e",
                    "-p",
                    str(port),
                    "-h",
                    f"{SSH_DIR}/host_key",
                    "-o",
                    f"AuthorizedKeysFile={SSH_DIR}/authorized_keys",
                    "-o",
                    "StrictModes=no",
                    "-o",
                    "UsePAM=no",
                    "-o",
                    "PermitRootLogin=prohibit-password",
                    "-o",
                    "PidFile=/tmp/sshd.pid",
                    "-o",
                    "ListenAddress=127.0.0.1",
                ],
            )
            pod = Pod(self.namespace, h, tpl, h, hosts=hosts)
            started = self.agent.kubelet.start(pod, self.agent.logs)
            self.agent.track(self.uid, [p for _, p in started])
            workers += started
        try:
            for h, port in ports.items():
                if not _wait_port(port, lambda: all(p.running() for _, p in workers)):
                    return 1, f"sshd of {h} did not start"
            # The launcher: DeepSpeed's runner with the pod's environment in ~/.deepspeed_env.
            container = template["spec"]["containers"][0]
            image_env = dict(e.split("=", 1) for e in image_config(container["image"]).get("Env") or [])
            env = {
                **image_env,
                **self.agent.kubelet.node_env,
                **{e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e},
            }
            home = env.get("HOME", "/root")
            (ssh / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "HOME"))
            argv = [
                "deepspeed",
                "--hostfile",
                f"{SSH_DIR}/hostfile",
                "--master_addr",
                hosts[0],
                "--master_port",
                str(MASTER_PORT),
            ]
            if not config.get("localRank", True):
                argv.append("--no_local_rank")
            argv += ["--no_python", *exec_argv]
            script = (
                f"mkdir -p /root/.ssh && cp {SSH_DIR}/config /root/.ssh/config && "
                f"cp {SSH_DIR}/deepspeed_env {shlex.quote(home)}/.deepspeed_env && exec " + shlex.join(argv)
            )
            launcher_tpl = _with(template, volumes, ["sh", "-c", script])
            launcher = Pod(self.namespace, f"{self.name}-launcher", launcher_tpl, f"{self.name}-launcher", hosts=hosts)
            return self.run_pod(launcher)
        finally:
            for _, proc in workers:
                proc.kill()
            for rec, proc in workers:
                rec.exit_code = proc.wait(30)


def _with(template: dict[str, Any], volumes: list[dict[str, Any]], command: list[str]) -> dict[str, Any]:
    """The worker template with T9k's SSH volume and ``command``."""
    import copy

    tpl = copy.deepcopy(template)
    tpl["spec"]["volumes"] = volumes
    c = tpl["spec"]["containers"][0]
    c["command"] = command
    c.pop("args", None)
    c["volumeMounts"] = [*(c.get("volumeMounts") or []), {"name": "t9k-ssh", "mountPath": SSH_DIR, "readOnly": True}]
    return tpl
