"""The per-job worker identity: a ServiceAccount, a Role and a RoleBinding owned by the FineTuneJob.

Why per job: the progress-reporting worker pod (rank 0) patches ``status.reported`` of its FineTuneJob, and
RBAC cannot narrow the status subresource to one field. With one shared ServiceAccount per namespace, every
worker (running a user's image and arguments) could patch the status of *every* FineTuneJob there. The Role
here names the job in ``resourceNames``, so a worker can touch its own FineTuneJob's status and nothing else;
what it writes there is only ever shown as progress (the operator decides from child workloads).

The three objects are part of the plan's shared objects: created with the first step, garbage-collected with
the FineTuneJob through its ownerReference. An install that sets a shared worker ServiceAccount
(``RenderOptions.worker_service_account``, ``FT_WORKER_SERVICE_ACCOUNT``) gets none of them.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api import constants as c
from finetune_operator.api.naming import child_name
from finetune_operator.api.types import FineTuneJob
from finetune_operator.render.meta import metadata

COMPONENT_IDENTITY = "worker-identity"


def worker_identity_name(job: FineTuneJob) -> str:
    """Name of the job's worker ServiceAccount, Role and RoleBinding (one per job, shared by its runs)."""
    return child_name(job.name, "worker")


def worker_identity(job: FineTuneJob) -> list[dict[str, Any]]:
    """ServiceAccount, Role (``patch`` on this job's ``finetunejobs/status`` only) and RoleBinding."""
    name = worker_identity_name(job)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(job, name, COMPONENT_IDENTITY, "shared"),
            # Only the reporting pod mounts a token (it sets automountServiceAccountToken itself).
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(job, name, COMPONENT_IDENTITY, "shared"),
            "rules": [
                {
                    "apiGroups": [c.GROUP],
                    "resources": [f"{c.PLURAL}/status"],
                    "resourceNames": [job.name],
                    "verbs": ["patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(job, name, COMPONENT_IDENTITY, "shared"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace}],
        },
    ]
