"""Kubeflow Trainer v2's ``TrainJob`` (trainer.kubeflow.org/v1alpha1), played for real.

What the Trainer controller, JobSet's controller and the Job controller do together for a TrainJob, as of
kubeflow/trainer ``8c0f5059`` (the release the ``trainjob`` backend targets; its CRD and the
``torch-distributed`` runtime are vendored in tests/fixtures/crds) and JobSet v0.12:

1. **Runtime.** ``spec.runtimeRef`` names a ``ClusterTrainingRuntime`` (cluster-scoped) or a
   ``TrainingRuntime`` (the TrainJob's namespace), read from the store, where the test installed it as a cluster
   admin installs Trainer v2 (:func:`install_runtimes`). Until it exists the TrainJob waits (Trainer's
   reconcile fails and retries; its admission webhook would have refused the TrainJob); another ``kind`` fails
   it with ``TrainingRuntimeNotSupported``.
2. **Runtime patches** (``spec.runtimePatches[].trainingRuntimeSpec.template.spec``): a strategic merge patch
   of the runtime's JobSet spec, one entry after the other (pkg/runtime/core ``mergeRuntimePatches``):
   ``replicatedJobs``, ``containers``, ``initContainers``, ``env``, ``volumes``, ``imagePullSecrets`` and
   ``schedulingGates`` merge by ``name``, ``volumeMounts`` by ``mountPath``, ``ports`` by ``containerPort``;
   maps merge; every other list (``tolerations``) is replaced.
3. **Trainer overrides** on the ``node`` container of the replicated job labelled
   ``trainer.kubeflow.org/trainjob-ancestor-step: trainer``: ``image``, ``command``, ``args``, ``env``
   (upserted by name), ``resourcesPerNode`` (merged over the runtime's per resource name), ``numNodes`` (else
   the runtime's ``mlPolicy.numNodes``).
4. **Torch plugin** (runtimes with ``mlPolicy.torch``): ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (``numProcPerNode``;
   ``auto``, or the CPU count without GPUs), ``PET_NODE_RANK`` (``fieldRef`` on the Job completion-index
   annotation), ``PET_MASTER_ADDR`` ``<trainjob>-node-0-0.<trainjob>``, ``PET_MASTER_PORT`` and the container
   port. The port is Trainer's 29500 in a cluster; here every pod shares this machine's network, so a free port.
5. **JobSet and Job.** One Job ``<trainjob>-node-0`` (``completionMode: Indexed``, parallelism = completions =
   nodes, ``restartPolicy`` defaulted to ``OnFailure``, ``backoffLimit`` the template's or Kubernetes' 6: the
   torch-distributed runtime sets none and runtime patches cannot), pods ``<trainjob>-node-0-<i>-<suffix>``
   with hostname ``<trainjob>-node-0-<i>`` in the subdomain ``<trainjob>`` (JobSet's headless Service), the
   completion index as annotation and ``JOB_COMPLETION_INDEX``.
6. **Status**, as Trainer writes it: ``Suspended`` (``Suspended``/``TrainJob is suspended``, then status False
   ``Resumed``/``TrainJob is resumed``), ``Complete`` and ``Failed`` copied from JobSet's ``Completed``
   (``AllJobsCompleted``/``jobset completed successfully``) and ``Failed`` (``FailedJobs``/``jobset failed due to
   one or more job failures``), and ``jobsStatus`` (per replicated job: ready, succeeded, failed, active,
   suspended Jobs). No ``Created`` condition: Trainer removed it (kubeflow/trainer#2621).

Where a cluster would differ: a failed node pod leaves its peers waiting in torch's rendezvous (a kubelet
restarts only the failed container, ``OnFailure``); here the peers are stopped and the whole group restarts,
each failed pod counting against ``backoffLimit``. ``spec.suspend`` set while running stops the pods (JobSet
suspends its Jobs; the Job controller deletes their pods, not counted as failures) and starts them again on
resume. No JobSet or Job objects are stored (the operator watches TrainJobs only), so the Pod objects the agent
writes have the TrainJob as their controller ownerReference (in a cluster: the Job ``<trainjob>-node-0``, owned by
the JobSet, owned by the TrainJob); the garbage collector still deletes them with the TrainJob.
``activeDeadlineSeconds`` is not enforced.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from tests.node_agent.controllers import Controller, Result, _free_port, suffix
from tests.node_agent.pods import Pod

if TYPE_CHECKING:
    from tests.emulator import EmulatorServer
    from tests.node_agent.agent import NodeAgent

GROUP: Final = "trainer.kubeflow.org"
#: runtimeRef.kind -> (emulator resource, namespaced).
RUNTIMES: Final = {
    "ClusterTrainingRuntime": (f"clustertrainingruntimes.{GROUP}", False),
    "TrainingRuntime": (f"trainingruntimes.{GROUP}", True),
}
#: The vendored runtime (kubeflow/trainer manifests/base/runtimes/torch_distributed.yaml).
TORCH_DISTRIBUTED: Final = (
    Path(__file__).parents[1] / "fixtures/crds/trainer.kubeflow.org_torch-distributed-runtime.yaml"
)

# Trainer v2's constants (pkg/constants) and Kubernetes'.
ANCESTOR_LABEL: Final = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_TRAINER: Final = "trainer"
NODE: Final = "node"
CONTAINER_TRAINER_PORT: Final = 29500
COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
DEFAULT_BACKOFF_LIMIT: Final = 6
MULTIKUEUE: Final = "kueue.x-k8s.io/multikueue"

#: patchMergeKey of the lists a strategic merge patch merges (JobSet's and core/v1's struct tags).
MERGE_KEYS: Final = {
    "replicatedJobs": "name",
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "schedulingGates": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def install_runtimes(server: EmulatorServer, *runtimes: Path) -> None:
    """What a cluster admin installing Trainer v2 does: its runtime kinds are served (as their CRDs would make
    them; the CRDs themselves are not vendored: 680 kB each) and the runtimes are created (default: the vendored
    ``torch-distributed``)."""
    for kind, (resource, namespaced) in RUNTIMES.items():
        plural = resource.split(".")[0]
        server.call(server.emulator.register, f"{GROUP}/v1alpha1/{plural}", kind, namespaced=namespaced, status=False)
    for path in runtimes or (TORCH_DISTRIBUTED,):
        server.create(yaml.safe_load(path.read_text()))


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """``patch`` merged into ``base`` as Kubernetes' strategic merge patch does for these types (see MERGE_KEYS;
    ``null`` deletes a key)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(out[key], value, key) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(merged) if isinstance(b, dict) and b.get(key) == item.get(key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = strategic_merge(merged[at], item)
        return merged
    return copy.deepcopy(patch)


def upsert(items: list[dict[str, Any]], new: list[dict[str, Any]], key: str = "name") -> None:
    """Trainer's ``apply.UpsertEnvVars``/``UpsertPort``: replace by key in place, else append."""
    for item in new:
        at = next((i for i, old in enumerate(items) if old.get(key) == item.get(key)), None)
        if at is None:
            items.append(copy.deepcopy(item))
        else:
            items[at] = copy.deepcopy(item)


def _cpu_count(quantity: Any) -> int:
    text = str(quantity)
    return int(float(text[:-1]) / 1000) if text.endswith("m") else int(float(text))


def _num_proc_per_node(trainer: dict[str, Any], resources: dict[str, Any]) -> str:
    """Torch plugin: ``numProcPerNode``, else ``auto`` (torchrun: one per GPU), or the CPU count without GPUs."""
    if trainer.get("numProcPerNode") is not None:
        return str(trainer["numProcPerNode"])
    gpus = sum(
        int(v)
        for part in ("limits", "requests")
        for k, v in (resources.get(part) or {}).items()
        if k.endswith("/gpu") and str(v).isdigit()
    )
    if gpus:
        return "auto"
    cpu = (resources.get("requests") or {}).get("cpu") or (resources.get("limits") or {}).get("cpu") or 0
    return str(max(1, _cpu_count(cpu)))


@dataclass
class TrainerJob:
    """The trainer's batch/v1 Job as JobSet would create it from the TrainJob."""

    name: str
    subdomain: str
    nodes: int
    backoff_limit: int
    template: dict[str, Any]


class RuntimeMismatch(Exception):
    """The runtime cannot run this TrainJob (no trainer replicated job or ``node`` container)."""


def trainer_job(trainjob: dict[str, Any], runtime: dict[str, Any], master_port: int) -> TrainerJob:
    """Steps 2-5 of the module docstring."""
    name = trainjob["metadata"]["name"]
    spec = trainjob["spec"]
    trainer = spec.get("trainer") or {}
    rt_spec = runtime.get("spec") or {}
    ml = rt_spec.get("mlPolicy") or {}
    jobset = copy.deepcopy((rt_spec.get("template") or {}).get("spec") or {})
    for patch in spec.get("runtimePatches") or []:
        patch_spec = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec")
        if patch_spec:
            jobset = strategic_merge(jobset, patch_spec)
    rjob = next(
        (
            r
            for r in jobset.get("replicatedJobs") or []
            if ((r.get("template") or {}).get("metadata") or {}).get("labels", {}).get(ANCESTOR_LABEL)
            == ANCESTOR_TRAINER
        ),
        None,
    )
    if rjob is None:
        raise RuntimeMismatch(f"runtime {runtime['metadata']['name']}: no replicated job with {ANCESTOR_LABEL}=trainer")
    job_spec = rjob["template"]["spec"]
    template = job_spec["template"]
    pod = template.setdefault("spec", {})
    container = next((c for c in pod.get("containers") or [] if c.get("name") == NODE), None)
    if container is None:
        raise RuntimeMismatch(f"runtime {runtime['metadata']['name']}: replicated job {rjob['name']} has no {NODE!r}")
    nodes = int(trainer.get("numNodes") or ml.get("numNodes") or 1)
    resources = copy.deepcopy(container.get("resources") or {})
    for part, values in (trainer.get("resourcesPerNode") or {}).items():
        resources[part] = {**(resources.get(part) or {}), **values}
    if resources:
        container["resources"] = resources
    for key in ("image", "command", "args"):
        if trainer.get(key) is not None:
            container[key] = copy.deepcopy(trainer[key])
    env = container.setdefault("env", [])
    upsert(env, trainer.get("env") or [])
    if "torch" in ml:
        master = f"{name}-{NODE}-0-0.{name}"
        upsert(
            env,
            [
                {"name": "PET_NNODES", "value": str(nodes)},
                {"name": "PET_NPROC_PER_NODE", "value": _num_proc_per_node(trainer, resources)},
                {
                    "name": "PET_NODE_RANK",
                    "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
                },
                {"name": "PET_MASTER_ADDR", "value": master},
                {"name": "PET_MASTER_PORT", "value": str(master_port)},
            ],
        )
        upsert(container.setdefault("ports", []), [{"containerPort": master_port}], "containerPort")
    pod.setdefault("restartPolicy", "OnFailure")  # JobSet's webhook default
    job_name = f"{name}-{rjob['name']}-0"
    labels = template.setdefault("metadata", {}).setdefault("labels", {})
    labels.update(
        {
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
            "jobset.sigs.k8s.io/job-index": "0",
            "batch.kubernetes.io/job-name": job_name,
        }
    )
    return TrainerJob(
        name=job_name,
        subdomain=name,
        nodes=nodes,
        backoff_limit=int(job_spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
        template=template,
    )


def runtime_of(server: EmulatorServer, trainjob: dict[str, Any]) -> dict[str, Any] | None:
    """The runtime ``spec.runtimeRef`` names (None: not there, or not a kind Trainer runs)."""
    ref = trainjob["spec"].get("runtimeRef") or {}
    resource, namespaced = RUNTIMES.get(ref.get("kind", "ClusterTrainingRuntime"), ("", False))
    if not resource:
        return None
    return server.get(resource, ref["name"], trainjob["metadata"]["namespace"] if namespaced else None)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict[str, Any]], ctype: str, status: str, reason: str, message: str) -> None:
    """apimachinery's ``meta.SetStatusCondition``: one entry per type; the transition time moves with status."""
    old = next((c for c in conditions if c["type"] == ctype), None)
    new = {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}
    if old is None:
        conditions.append(new)
        return
    if old["status"] == status:
        new["lastTransitionTime"] = old["lastTransitionTime"]
    old.update(new)


def jobs_status(**counts: int) -> list[dict[str, Any]]:
    """``status.jobsStatus`` of the one replicated job (counts of its Jobs)."""
    return [{"name": NODE, **{k: counts.get(k, 0) for k in ("ready", "succeeded", "failed", "active", "suspended")}}]


class TrainJobController(Controller):
    kind = "TrainJob"

    def __init__(self, agent: NodeAgent, obj: dict[str, Any]) -> None:
        super().__init__(agent, obj)
        #: The TrainJob's status conditions as this controller last wrote them.
        self.conditions: list[dict[str, Any]] = list((obj.get("status") or {}).get("conditions") or [])

    def run(self) -> None:
        obj = self.current()
        if obj is None or obj["spec"].get("managedBy") == MULTIKUEUE:
            return
        ref = obj["spec"].get("runtimeRef") or {}
        if ref.get("kind", "ClusterTrainingRuntime") not in RUNTIMES:
            msg = f"unsupported runtime: {ref.get('kind')}.{ref.get('apiGroup', GROUP)}"
            set_condition(self.conditions, "Failed", "True", "TrainingRuntimeNotSupported", msg)
            self.patch_status({"conditions": self.conditions})
            return
        if not self._resumed():
            return
        runtime = self.wait_runtime()
        if runtime is None:
            return
        port = _free_port()  # one shared network: Trainer's 29500 may be taken (see the module docstring)
        try:
            job = trainer_job(self.current() or obj, runtime, port)
        except RuntimeMismatch as exc:  # JobSet cannot be built: Trainer retries, with a Warning event
            self.agent.errors.append(exc)
            return
        failed = 0
        while True:
            self.patch_status({"conditions": self.conditions, "jobsStatus": jobs_status(active=1, ready=1)})
            bad = self.run_group(job)
            if self.current() is None:
                return
            if bad is None:  # suspended while running: the pods are gone, nothing failed
                if not self._resumed():
                    return
                continue
            if not bad:
                set_condition(self.conditions, "Complete", "True", "AllJobsCompleted", "jobset completed successfully")
                self.patch_status({"conditions": self.conditions, "jobsStatus": jobs_status(succeeded=1)})
                return
            failed += len(bad)
            if failed > job.backoff_limit:
                set_condition(
                    self.conditions, "Failed", "True", "FailedJobs", "jobset failed due to one or more job failures"
                )
                self.patch_status({"conditions": self.conditions, "jobsStatus": jobs_status(failed=1)})
                return

    def _resumed(self) -> bool:
        """Trainer's ``Suspended`` condition while ``spec.suspend``; False when the TrainJob went away."""
        obj = self.current()
        if obj is None:
            return False
        if not obj["spec"].get("suspend"):
            return True
        set_condition(self.conditions, "Suspended", "True", "Suspended", "TrainJob is suspended")
        self.patch_status({"conditions": self.conditions, "jobsStatus": jobs_status(suspended=1)})
        if self.wait(lambda o: not o["spec"].get("suspend")) is None:
            return False
        set_condition(self.conditions, "Suspended", "False", "Resumed", "TrainJob is resumed")
        return True

    def wait_runtime(self) -> dict[str, Any] | None:
        """The referenced runtime, once it exists (None when the TrainJob goes away first)."""

        def check() -> Any:
            obj = self.current()
            if obj is None or self.stopped.is_set():
                return ("gone",)
            runtime = runtime_of(self.agent.server, obj)
            return ("ok", runtime) if runtime is not None else None

        got = self.agent.server.wait_for(check, 3600, f"the runtime of TrainJob {self.namespace}/{self.name}")
        return got[1] if got[0] == "ok" else None

    def run_group(self, job: TrainerJob) -> list[Result] | None:
        """Run every index of the Job to the end: the pods that failed (not those stopped because a peer failed);
        None when ``spec.suspend`` stopped them."""
        failures: list[Result] = []
        finished = threading.Event()
        suspended = threading.Event()
        stopping = threading.Event()
        lock = threading.Lock()
        hosts = [
            f"{job.name}-{i}.{job.subdomain}{tail}"
            for i in range(job.nodes)
            for tail in ("", f".{self.namespace}.svc", f".{self.namespace}.svc.cluster.local")
        ]

        def one(index: int) -> None:
            hostname = f"{job.name}-{index}"
            pod = Pod(
                namespace=self.namespace,
                name=f"{hostname}-{suffix()}",
                template=job.template,
                hostname=hostname,
                subdomain=job.subdomain,
                extra_env={"JOB_COMPLETION_INDEX": str(index), "PYTHONUNBUFFERED": "1"},
                annotations={COMPLETION_INDEX: str(index)},
                hosts=hosts,
                # The Job controller's labels (the JobSet's are on the template, see trainer_job).
                labels={COMPLETION_INDEX: str(index), "job-name": job.name},
            )
            code, message = self.run_pod(pod)
            if code == 0:
                return
            with lock:
                if stopping.is_set():
                    return  # stopped by us: a peer failed, or the TrainJob was suspended
                stopping.set()
                failures.append((code, message))
            # Its peers would wait in the rendezvous for a node that is gone (see the module docstring).
            for proc in self.agent.processes(self.uid):
                proc.kill()

        def watch_suspend() -> None:
            with contextlib.suppress(TimeoutError):
                obj = self.wait(lambda o: finished.is_set() or bool(o["spec"].get("suspend")), timeout=24 * 3600)
                with lock:
                    if obj is None or finished.is_set():
                        return
                    suspended.set()
                    stopping.set()
                for proc in self.agent.processes(self.uid):
                    proc.kill()

        watcher = threading.Thread(target=watch_suspend, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(job.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished.set()
        with self.agent.server.emulator.changed:
            self.agent.server.emulator.changed.notify_all()
        watcher.join(30)
        return None if suspended.is_set() else failures
