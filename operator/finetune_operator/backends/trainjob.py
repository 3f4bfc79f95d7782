"""``backend: trainjob``: Kubeflow Trainer v2's TrainJob (``trainer.kubeflow.org/v1alpha1``).

Targets the Trainer v2 API as of kubeflow/trainer commit ``8c0f5059`` (2026-08-21; the CRD vendored in
tests/fixtures/crds), whose override mechanism is ``spec.runtimePatches``. A TrainJob references a training
runtime (``spec.trainingRuntime``; default the ``torch-distributed`` ClusterTrainingRuntime that Trainer v2
installs) and overrides what the runtime leaves open:

* ``spec.trainer``: the worker image, command (``ftctl worker train``), env (the ``FT_*`` variables),
  ``numNodes``, ``numProcPerNode`` and ``resourcesPerNode``;
* ``spec.runtimePatches`` (one entry, ``manager: finetune.dev/finetune-operator``) patches the runtime's
  ``node`` replicated job: our labels on the pods, the volumes (claims, generated configs, emptyDirs), the
  trainer container's mounts and Pod Security "restricted" contexts, the worker ServiceAccount, node selector,
  tolerations and affinity.

The torch plugin of the runtime sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the Job
completion index), ``PET_MASTER_ADDR`` (``<trainjob>-node-0-0.<trainjob>``, JobSet's headless Service) and
``PET_MASTER_PORT`` (29500) on the ``node`` container; the worker maps them to LLaMA-Factory's launcher. The
runtime patches cannot set ``automountServiceAccountToken``, so the token for progress reports comes from a
projected ``serviceAccountToken`` volume at the standard path (every node pod has it; only rank 0 uses it).
They cannot set ``priorityClassName`` or ``schedulerName`` either: those belong to the runtime (validation
refuses them with this backend). ``spec.suspend`` is the TrainJob's own; Kueue admits TrainJobs by the
``kueue.x-k8s.io/queue-name`` label (created suspended). Status: conditions ``Complete``, ``Failed`` (JobSet's
``Completed``/``Failed`` copied, reasons ``AllJobsCompleted``, ``FailedJobs``...) and ``Suspended``; running is
``status.jobsStatus`` with an active or ready Job (this release writes no ``Created`` condition since
kubeflow/trainer#2621; an older release's ``Created`` is still read as running).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.api import constants as c
from finetune_operator.api.naming import workload_name
from finetune_operator.api.types import TrainingRuntimeRef
from finetune_operator.backends.base import (
    ChildStatus,
    ConditionKinds,
    Phase,
    Rule,
    StageInput,
    by_conditions,
    workload_rule,
)
from finetune_operator.backends.launch import Launch, Topology, torchrun_launch, torchrun_topology
from finetune_operator.render.meta import COMPONENT_TRAIN, metadata, run_scope
from finetune_operator.render.pods import Resources
from finetune_operator.render.workloads import created_suspended, kueue_labels, train_pod

#: The runtime Trainer v2 installs for PyTorch (manifests/base/runtimes/torch_distributed.yaml).
DEFAULT_RUNTIME: Final = "torch-distributed"
#: Name of the runtime's replicated job and of its trainer container (Trainer v2's ``constants.Node``).
NODE: Final = "node"
#: ``runtimePatches[].manager``: who owns the patch entry.
PATCH_MANAGER: Final = f"{c.GROUP}/{c.MANAGER}"
#: Where the projected ServiceAccount token is mounted (the path the progress reporter reads).
SA_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Pod-spec fields a runtime patch may set (the rest of the rendered pod template is not patchable).
_POD_FIELDS: Final = (
    "securityContext",
    "serviceAccountName",
    "nodeSelector",
    "tolerations",
    "affinity",
    "terminationGracePeriodSeconds",
)


def _token_volume() -> dict[str, Any]:
    """What ``automountServiceAccountToken: true`` would mount: a rotating token, the CA and the namespace."""
    return {
        "name": "kube-api-access",
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                        ]
                    }
                },
            ],
        },
    }


#: What the controller's condition types mean (see :func:`~finetune_operator.backends.base.by_conditions`).
_CONDITIONS = ConditionKinds(succeeded=("Complete",), running=("Created",))


def _jobs_started(obj: Mapping[str, Any]) -> bool:
    """A child Job of the TrainJob's JobSet is active or ready (``status.jobsStatus``, counts of Jobs)."""
    for job in (obj.get("status") or {}).get("jobsStatus") or []:
        if isinstance(job, Mapping) and any(_count(job.get(k)) > 0 for k in ("active", "ready")):
            return True
    return False


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class TrainJobBackend:
    """Kubeflow Trainer v2 TrainJob (see the module docstring)."""

    name: Final = "trainjob"
    api_version: Final = "trainer.kubeflow.org/v1alpha1"
    kind: Final = "TrainJob"
    plural: Final = "trainjobs"
    suspend_path: Final = ("spec", "suspend")
    kueue: Final = True
    targets: Final = "Kubeflow Trainer v2 trainer.kubeflow.org/v1alpha1 (kubeflow/trainer 8c0f5059, runtimePatches)"

    def build(self, inp: StageInput) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        job, stage = inp.job, inp.stage
        res = stage.resources
        tpl = train_pod(inp, self.name, service_account=inp.service_account)
        pod = tpl["spec"]
        container = pod["containers"][0]
        runtime = job.spec.training_runtime or TrainingRuntimeRef()
        pod_patch: dict[str, Any] = {
            "containers": [
                {
                    "name": NODE,
                    "securityContext": container["securityContext"],
                    "volumeMounts": [
                        *container["volumeMounts"],
                        {"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True},
                    ],
                }
            ],
            "volumes": [*pod["volumes"], _token_volume()],
        }
        pod_patch.update({k: pod[k] for k in _POD_FIELDS if k in pod})
        trainer: dict[str, Any] = {
            "image": container["image"],
            "command": container["command"],
            "env": container["env"],
            "numNodes": inp.nodes,
            "numProcPerNode": inp.nproc_per_node,
        }
        resources = Resources(
            gpus=inp.gpus_per_node, cpu=res.cpu if res else None, memory=res.memory if res else None
        ).to_k8s()
        if resources:
            trainer["resourcesPerNode"] = resources
        wl = {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": metadata(
                job, workload_name(run_scope(job), stage.name), COMPONENT_TRAIN, stage.name, **kueue_labels(job)
            ),
            "spec": {
                "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": runtime.kind, "name": runtime.name},
                "suspend": created_suspended(job),
                "trainer": trainer,
                "runtimePatches": [
                    {
                        "manager": PATCH_MANAGER,
                        "trainingRuntimeSpec": {
                            "template": {
                                "spec": {
                                    "replicatedJobs": [
                                        {
                                            "name": NODE,
                                            "template": {
                                                "spec": {"template": {"metadata": tpl["metadata"], "spec": pod_patch}}
                                            },
                                        }
                                    ]
                                }
                            }
                        },
                    }
                ],
            },
        }
        return [wl], wl

    def interpret(self, obj: Mapping[str, Any]) -> ChildStatus:
        """Conditions ``Complete``/``Failed``; ``Suspended`` (or our flag); running once a child Job is active or
        ready (``status.jobsStatus``), or ``Created`` (releases before kubeflow/trainer#2621)."""
        got = by_conditions(obj, self.suspend_path, _CONDITIONS)
        if got.phase == Phase.PENDING and _jobs_started(obj):
            return ChildStatus(Phase.RUNNING)
        return got

    def rules(self) -> tuple[Rule, ...]:
        return (workload_rule(self, "training stages of the trainjob backend (Kubeflow Trainer v2)"),)

    def plan_launch(self, environ: Mapping[str, str], *, force_torchrun: bool = False) -> Launch:
        """The torch plugin's ``PET_*`` variables (torchrun's environment defaults); without them (a runtime
        without the torch policy) one node."""
        topo = torchrun_topology(environ) if environ.get("PET_NNODES") else Topology()
        return torchrun_launch(self.name, topo, environ, force_torchrun=force_torchrun)


BACKEND: Final = TrainJobBackend()
