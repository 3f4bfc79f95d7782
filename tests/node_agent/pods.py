"""The kubelet part: turn one pod (a rendered PodTemplateSpec plus its name) into container processes.

What is honoured, as a kubelet would: ``command``/``args`` (falling back to the image's ENTRYPOINT/CMD),
``env`` (``value``; ``valueFrom.secretKeyRef`` read from the emulated Secrets, a missing non-optional one
fails the pod; ``valueFrom.fieldRef``), ``volumeMounts`` (one host folder per PVC claim, ConfigMap keys as
files, ``emptyDir`` including ``/dev/shm``, ``subPath``, ``readOnly``), ``securityContext``
``runAsUser``/``runAsGroup`` (container over pod over image) and ``fsGroup`` (group ownership and setgid on
writable volumes, ``fsGroupChangePolicy: OnRootMismatch``), ``workingDir``, the ServiceAccount token when
``automountServiceAccountToken`` is true (not into a container that mounts that path itself), ``projected``
volumes (``serviceAccountToken``, ConfigMap/Secret keys, downward API ``fieldRef``), ``HOSTNAME`` and an
``/etc/hosts`` in which the pod's own name and every name the cluster DNS would answer for the namespace
(Services, pods of headless Services) point to this machine (chroot isolation shares the host network);
``initContainers`` (in order, each to completion,
before the containers start).

Pod objects (:class:`PodObjects`): for a pod its workload controller gives an ownerReference, the agent
writes the Pod into the emulator as the real controller and kubelet would: name, namespace, the template's
labels plus the controller's, the controller ownerReference (the emulator's garbage collector deletes it with
its workload), ``status.phase`` and ``initContainerStatuses``/``containerStatuses`` (waiting, running,
terminated with exit code, reason and the termination message read from the container's
``terminationMessagePath`` file, at most 4096 bytes, or the log's tail with ``FallbackToLogsOnError``). A
container whose ``env`` names a missing Secret or key is not created: the pod stays ``Pending``, the
container waiting with ``CreateContainerConfigError`` and the kubelet's message, and the kubelet tries again
(:class:`ConfigError`) until the Secret appears or the pod's workload is deleted.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.node_agent.buildah import Containers, Mount, Process, image_config

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: The kubelet's default ``terminationMessagePath``.
TERMINATION_LOG = "/dev/termination-log"
#: Where the file is mounted when the path is under ``/dev``: buildah's chroot ``/dev`` is read-only and a
#: file cannot be bind-mounted there, so the agent mounts it here and points the worker at it
#: (``FT_TERMINATION_LOG``, which the worker honours); see README.md.
TERMINATION_MOUNT = "/run/termination-log"
#: The kubelet keeps at most this many bytes of a termination message (and 2048 of the log's tail).
MAX_MESSAGE = 4096
MAX_LOG_TAIL = 2048


class PodError(Exception):
    """The pod cannot start (a kubelet reports it as a container waiting with a reason)."""


class ConfigError(PodError):
    """A container's configuration cannot be resolved (a missing Secret or key): the kubelet does not create
    it, reports ``CreateContainerConfigError`` with this message, and tries again later."""

    def __init__(self, message: str, container: str = "") -> None:
        super().__init__(message)
        self.container = container


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodObjects:
    """Writes the Pod objects of the pods the agent runs into the emulator (directly into its store, as the
    other controller players do), with the status a kubelet reports."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def create(self, pod: Pod) -> None:
        if pod.owner is None or self.server.get("pods", pod.name, pod.namespace) is not None:
            return
        labels = {**((pod.template.get("metadata") or {}).get("labels") or {}), **pod.labels}
        annotations = {**((pod.template.get("metadata") or {}).get("annotations") or {}), **pod.annotations}
        meta: dict[str, Any] = {
            "name": pod.name,
            "namespace": pod.namespace,
            "labels": labels,
            "ownerReferences": [pod.owner],
        }
        if annotations:
            meta["annotations"] = annotations
        spec = {**pod.spec, "hostname": pod.hostname, "nodeName": "node-agent"}
        self.server.create({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
        self.write(pod)

    def write(self, pod: Pod) -> None:
        """The pod's status from its containers' states (whole lists: a merge patch replaces lists)."""
        if pod.owner is None:
            return
        spec = pod.spec
        inits = [c["name"] for c in spec.get("initContainers") or []]
        mains = [c["name"] for c in spec.get("containers") or []]

        def statuses(names: list[str]) -> list[dict[str, Any]]:
            out = []
            for name in names:
                state = pod.states.get(name) or {
                    "waiting": {"reason": "PodInitializing" if inits else "ContainerCreating"}
                }
                out.append(
                    {
                        "name": name,
                        "ready": "running" in state,
                        "restartCount": 0,
                        "started": "running" in state,
                        "image": next(
                            c["image"]
                            for c in [*(spec.get("initContainers") or []), *spec["containers"]]
                            if c["name"] == name
                        ),
                        "imageID": "",
                        "state": state,
                    }
                )
            return out

        status: dict[str, Any] = {"phase": pod.phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1"}
        if pod.start_time:
            status["startTime"] = pod.start_time
        if inits:
            status["initContainerStatuses"] = statuses(inits)
        status["containerStatuses"] = statuses(mains)
        with contextlib.suppress(Exception):  # deleted meanwhile (its workload went): nothing to report
            if self.server.get("pods", pod.name, pod.namespace) is not None:
                self.server.patch_status("pods", pod.name, status, pod.namespace)


@dataclass
class Pod:
    """One pod of a workload: its template and what the workload controller decided for it."""

    namespace: str
    name: str
    template: dict[str, Any]
    hostname: str
    subdomain: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: Extra names resolving to this machine (pods of the same workload by their DNS names).
    hosts: Sequence[str] = ()
    #: The controller ownerReference of the Pod object; None: no Pod object is written.
    owner: dict[str, Any] | None = None
    #: Labels the workload controller adds to the template's (the Job controller's ``job-name``, ...).
    labels: dict[str, str] = field(default_factory=dict)
    #: The kubelet's view: phase, container name -> state, start time (what :class:`PodObjects` writes).
    phase: str = "Pending"
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    start_time: str | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.template.get("spec") or {})


@dataclass
class ContainerRecord:
    """What ran: for the tests' assertions (UIDs, logs)."""

    namespace: str
    pod: str
    container: str
    image: str
    user: str | None
    argv: list[str]
    log_path: Path
    exit_code: int | None = None
    #: Host file mounted at the container's terminationMessagePath.
    termination_path: Path | None = None
    #: terminationMessagePolicy.
    termination_policy: str = "File"
    started_at: str | None = None


class Kubelet:
    """Starts pods' containers; volumes live under ``root`` (``pvc/<ns>/<claim>``, ``pods/<pod>/...``)."""

    def __init__(
        self,
        containers: Containers,
        root: Path,
        *,
        lookup: Callable[[str, str, str], dict[str, Any] | None],
        namespace_names: Callable[[str], list[str]],
        node_env: Mapping[str, str] | None = None,
        token_for: Callable[[str, str], str] | None = None,
        objects: PodObjects | None = None,
    ) -> None:
        self.containers = containers
        self.root = root
        self.lookup = lookup  # (resource, namespace, name) -> object
        self.namespace_names = namespace_names
        self.node_env = dict(node_env or {})
        self.token_for = token_for or (lambda ns, sa: secrets.token_hex(16))
        self.records: list[ContainerRecord] = []
        self.objects = objects

    # ------------------------------------------------------------------ volumes

    def claim_dir(self, namespace: str, claim: str) -> Path:
        path = self.root / "pvc" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _apply_fs_group(self, path: Path, gid: int) -> None:
        """fsGroup with OnRootMismatch: when the volume root is not already ``gid``-owned and group-writable,
        give everything to the group, group-writable, setgid on folders (what the kubelet does)."""
        st = path.stat()
        if st.st_gid == gid and st.st_mode & 0o2070 == 0o2070:
            return
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath) / name
                if p.is_symlink():
                    continue
                os.chown(p, -1, gid)
                mode = p.stat().st_mode
                os.chmod(p, mode | 0o060 | (0o2010 if p.is_dir() else 0) | (0o010 if mode & 0o100 else 0))
        os.chown(path, -1, gid)
        os.chmod(path, path.stat().st_mode | 0o2070)

    def _volumes(self, pod: Pod, pod_dir: Path) -> dict[str, tuple[Path, bool]]:
        """Volume name -> (host folder, writable by the pod)."""
        out: dict[str, tuple[Path, bool]] = {}
        for vol in pod.spec.get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                out[name] = (self.claim_dir(pod.namespace, vol["persistentVolumeClaim"]["claimName"]), True)
            elif "configMap" in vol:
                cm_name = vol["configMap"]["name"]
                cm = self.lookup("configmaps", pod.namespace, cm_name)
                if cm is None and not vol["configMap"].get("optional"):
                    raise PodError(f'configmap "{cm_name}" not found')
                folder = pod_dir / "configmaps" / name
                folder.mkdir(parents=True, exist_ok=True)
                for key, value in ((cm or {}).get("data") or {}).items():
                    (folder / key).write_text(value)
                for key, value in ((cm or {}).get("binaryData") or {}).items():
                    (folder / key).write_bytes(base64.b64decode(value))
                for p in [folder, *folder.iterdir()]:
                    os.chmod(p, 0o755 if p.is_dir() else 0o644)
                out[name] = (folder, False)
            elif "hostPath" in vol:  # only the agent's own (T9k's SSH keys); rendered pods have none
                out[name] = (Path(vol["hostPath"]["path"]), False)
            elif "projected" in vol:
                folder = pod_dir / "projected" / name
                self._projected(pod, vol["projected"], folder)
                out[name] = (folder, False)
            elif "emptyDir" in vol:
                folder = pod_dir / "emptydir" / name
                folder.mkdir(parents=True, exist_ok=True)
                os.chmod(folder, 0o777)  # emptyDirs are world-writable
                out[name] = (folder, True)
            else:
                raise PodError(f"volume {name}: kind not supported by the node agent: {sorted(vol)}")
        return out

    def _projected(self, pod: Pod, spec: dict[str, Any], folder: Path) -> None:
        """A projected volume's files: ServiceAccount token, ConfigMap/Secret keys, downward API fields. A missing
        non-optional ConfigMap, Secret or key keeps the pod from starting, as with the kubelet."""
        files: dict[str, tuple[bytes, int | None]] = {}
        for source in spec.get("sources") or []:
            if "serviceAccountToken" in source:
                token = self.token_for(pod.namespace, pod.spec.get("serviceAccountName", "default"))
                files[source["serviceAccountToken"]["path"]] = (token.encode(), None)
            elif "configMap" in source or "secret" in source:
                kind = "configMap" if "configMap" in source else "secret"
                ref = source[kind]
                obj = self.lookup("configmaps" if kind == "configMap" else "secrets", pod.namespace, ref["name"])
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise PodError(f'{kind.lower()} "{ref["name"]}" not found (projected volume)')
                data = {
                    k: base64.b64decode(v)
                    for k, v in (obj.get("binaryData" if kind == "configMap" else "data") or {}).items()
                }
                data |= {
                    k: str(v).encode()
                    for k, v in (obj.get("data" if kind == "configMap" else "stringData") or {}).items()
                }
                for item in ref.get("items") or [{"key": k} for k in data]:
                    if item["key"] not in data:
                        if ref.get("optional"):
                            continue
                        raise PodError(
                            f'{kind.lower()} "{ref["name"]}" key "{item["key"]}" not found (projected volume)'
                        )
                    files[item.get("path", item["key"])] = (data[item["key"]], item.get("mode"))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if "fieldRef" not in item:
                        raise PodError(
                            f"downwardAPI item {item.get('path')}: only fieldRef is supported by the node agent"
                        )
                    files[item["path"]] = (self._field(pod, item["fieldRef"]["fieldPath"]).encode(), item.get("mode"))
            else:
                raise PodError(f"projected volume source not supported by the node agent: {sorted(source)}")
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)
        for rel, (content, mode) in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            os.chmod(path, mode if mode is not None else int(spec.get("defaultMode", 0o644)))

    # ------------------------------------------------------------------ env

    def _field(self, pod: Pod, path: str) -> str:
        simple = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "spec.nodeName": "node-agent",
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
        }
        if path in simple:
            return simple[path]
        for prefix, source in (
            ("metadata.labels", (pod.template.get("metadata") or {}).get("labels") or {}),
            (
                "metadata.annotations",
                {**((pod.template.get("metadata") or {}).get("annotations") or {}), **pod.annotations},
            ),
        ):
            if path.startswith(prefix + "['") and path.endswith("']"):
                return str(source.get(path[len(prefix) + 2 : -2], ""))
        raise PodError(f"fieldRef {path} not supported by the node agent")

    def _env(self, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = dict(self.node_env)
        env["HOSTNAME"] = pod.hostname
        env.update(pod.extra_env)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            src = var.get("valueFrom") or {}
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                secret = self.lookup("secrets", pod.namespace, ref["name"])
                data = (secret or {}).get("data") or {}
                if ref["key"] in data:
                    env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
                elif ref["key"] in ((secret or {}).get("stringData") or {}):
                    env[var["name"]] = secret["stringData"][ref["key"]]  # type: ignore[index]
                elif ref.get("optional"):
                    continue
                elif secret is None:  # the kubelet's words (pkg/kubelet/kubelet_pods.go)
                    raise ConfigError(f'secret "{ref["name"]}" not found', container.get("name", ""))
                else:
                    raise ConfigError(
                        f"couldn't find key {ref['key']} in Secret {pod.namespace}/{ref['name']}",
                        container.get("name", ""),
                    )
            elif "fieldRef" in src:
                env[var["name"]] = self._field(pod, src["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                cm = self.lookup("configmaps", pod.namespace, ref["name"]) or {}
                value = (cm.get("data") or {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise PodError(f'configmap "{ref["name"]}" key "{ref["key"]}" not found')
                if value is not None:
                    env[var["name"]] = value
            else:
                raise PodError(f"env {var['name']}: source not supported by the node agent")
        return env

    # ------------------------------------------------------------------ start

    def _hosts_file(self, pod: Pod, pod_dir: Path) -> Path:
        names = {pod.hostname}
        if pod.subdomain:
            names |= {
                f"{pod.hostname}.{pod.subdomain}",
                f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc",
                f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc.cluster.local",
            }
        names |= set(pod.hosts)
        for svc in self.namespace_names(pod.namespace):
            names |= {
                svc,
                f"{svc}.{pod.namespace}",
                f"{svc}.{pod.namespace}.svc",
                f"{svc}.{pod.namespace}.svc.cluster.local",
            }
        path = pod_dir / "hosts"
        path.write_text("127.0.0.1\tlocalhost\n" + "".join(f"127.0.0.1\t{n}\n" for n in sorted(names)))
        os.chmod(path, 0o644)
        return path

    def start(self, pod: Pod, logs: Path) -> list[tuple[ContainerRecord, Process]]:
        """Run the init containers to completion, then start every container of ``pod``; raises PodError when
        the pod cannot start (:class:`ConfigError` when a container's configuration cannot be resolved: the
        caller tries again later, as the kubelet does)."""
        if self.objects is not None:
            if pod.start_time is None:
                pod.start_time = _now()
            self.objects.create(pod)
        try:
            return self._start(pod, logs)
        except ConfigError as exc:
            pod.states[exc.container] = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            self._write(pod)
            raise
        except PodError:  # what the agent cannot run: the pod fails (a kubelet would keep it waiting)
            pod.phase = "Failed"
            self._write(pod)
            raise

    def _write(self, pod: Pod) -> None:
        if self.objects is not None:
            self.objects.write(pod)

    def _start(self, pod: Pod, logs: Path) -> list[tuple[ContainerRecord, Process]]:
        pod_dir = self.root / "pods" / pod.namespace / pod.name
        shutil.rmtree(pod_dir, ignore_errors=True)
        pod_dir.mkdir(parents=True)
        spec = pod.spec
        pod_sc = spec.get("securityContext") or {}
        volumes = self._volumes(pod, pod_dir)
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for vm in container.get("volumeMounts") or []:
                if vm.get("subPath") and vm["name"] in volumes:
                    (volumes[vm["name"]][0] / vm["subPath"]).mkdir(parents=True, exist_ok=True)
        if "fsGroup" in pod_sc:
            for path, writable in volumes.values():
                if writable:
                    self._apply_fs_group(path, int(pod_sc["fsGroup"]))
        hosts = self._hosts_file(pod, pod_dir)
        sa_mount: list[Mount] = []
        if spec.get("automountServiceAccountToken", True):
            sa = pod_dir / "serviceaccount"
            sa.mkdir()
            (sa / "token").write_text(self.token_for(pod.namespace, spec.get("serviceAccountName", "default")))
            (sa / "namespace").write_text(pod.namespace)
            for p in sa.iterdir():
                os.chmod(p, 0o644)
            sa_mount = [Mount(str(sa), SA_DIR, read_only=True)]
        base = [Mount(str(hosts), "/etc/hosts", read_only=True), *sa_mount]
        for container in spec.get("initContainers") or []:
            if ((pod.states.get(container["name"]) or {}).get("terminated") or {}).get("exitCode") == 0:
                continue  # done before a later container's configuration failed: not run again
            record, run = self._prepare(pod, container, volumes, base, pod_dir, logs)
            proc = run()
            self.records.append(record)
            pod.states[record.container] = {"running": {"startedAt": record.started_at}}
            self._write(pod)
            record.exit_code = proc.wait()
            self._terminated(pod, record)
            if record.exit_code != 0:
                pod.phase = "Failed"
                self._write(pod)
                raise PodError(f"init container {record.container} exited with code {record.exit_code}")
        # Every container's configuration is resolved before any starts (a missing Secret: none runs).
        prepared = [
            self._prepare(pod, container, volumes, base, pod_dir, logs) for container in spec.get("containers") or []
        ]
        started: list[tuple[ContainerRecord, Process]] = []
        for record, run in prepared:
            proc = run()
            self.records.append(record)
            started.append((record, proc))
            pod.states[record.container] = {"running": {"startedAt": record.started_at}}
        pod.phase = "Running"
        self._write(pod)
        return started

    def _prepare(
        self,
        pod: Pod,
        container: dict[str, Any],
        volumes: dict[str, tuple[Path, bool]],
        base: list[Mount],
        pod_dir: Path,
        logs: Path,
    ) -> tuple[ContainerRecord, Callable[[], Process]]:
        """The container's record and a function starting it (its env resolved now: ConfigError)."""
        spec = pod.spec
        pod_sc = spec.get("securityContext") or {}
        image = container["image"]
        cfg = image_config(image)
        sc = container.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        user = None
        if uid is not None:
            user = f"{uid}:{gid if gid is not None else 0}"
        elif cfg.get("User"):
            user = str(cfg["User"])
        if container.get("command") is not None:
            argv = list(container["command"]) + list(container.get("args") or [])
        else:
            entry = list(cfg.get("Entrypoint") or [])
            rest = container.get("args") if container.get("args") is not None else (cfg.get("Cmd") or [])
            argv = entry + list(rest)
        if not argv:
            raise PodError(f"container {container['name']}: no command")
        # The ServiceAccount admission plugin adds no token mount to a container that mounts that path itself.
        own_sa = any(vm.get("mountPath") == SA_DIR for vm in container.get("volumeMounts") or [])
        mounts = [m for m in base if not (own_sa and m.container == SA_DIR)]
        for vm in container.get("volumeMounts") or []:
            if vm["name"] not in volumes:
                raise PodError(f"volumeMount {vm['name']}: no such volume")
            host, _writable = volumes[vm["name"]]
            if vm.get("subPath"):
                host = host / vm["subPath"]
                if not host.exists():
                    host.mkdir(parents=True)
            mounts.append(Mount(str(host), vm["mountPath"], read_only=bool(vm.get("readOnly"))))
        env = self._env(pod, container)
        # The termination message file, writable by any user (as the kubelet creates it).
        term = pod_dir / "termination" / container["name"]
        term.parent.mkdir(exist_ok=True)
        term.write_text("")
        os.chmod(term, 0o666)
        target = container.get("terminationMessagePath") or TERMINATION_LOG
        if target.startswith("/dev/"):
            target = TERMINATION_MOUNT
            env.setdefault("FT_TERMINATION_LOG", TERMINATION_MOUNT)
        mounts.append(Mount(str(term), target))
        record = ContainerRecord(
            pod.namespace,
            pod.name,
            container["name"],
            image,
            user,
            argv,
            logs / f"{pod.namespace}_{pod.name}_{container['name']}.log",
            termination_path=term,
            termination_policy=str(container.get("terminationMessagePolicy") or "File"),
        )

        def run() -> Process:
            record.started_at = _now()
            return self.containers.run(
                image,
                argv,
                user=user,
                workdir=container.get("workingDir") or cfg.get("WorkingDir") or None,
                env=env,
                mounts=mounts,
                hostname=pod.hostname,
                log_path=record.log_path,
            )

        return record, run

    def _terminated(self, pod: Pod, record: ContainerRecord) -> None:
        """The container's terminated state, with the message the kubelet reads from its file."""
        code = record.exit_code if record.exit_code is not None else 1
        message = ""
        if record.termination_path is not None and record.termination_path.is_file():
            message = record.termination_path.read_bytes()[:MAX_MESSAGE].decode(errors="replace")
        if not message and code != 0 and record.termination_policy == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                message = record.log_path.read_bytes()[-MAX_LOG_TAIL:].decode(errors="replace")
        state: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": record.started_at,
            "finishedAt": _now(),
        }
        if message:
            state["message"] = message
        pod.states[record.container] = {"terminated": state}

    def finish(self, pod: Pod, records: Sequence[ContainerRecord]) -> None:
        """Every container of ``pod`` exited (``restartPolicy: Never``): terminated states and the phase."""
        for record in records:
            self._terminated(pod, record)
        pod.phase = "Succeeded" if all(r.exit_code == 0 for r in records) else "Failed"
        self._write(pod)
