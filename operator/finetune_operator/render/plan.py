"""The renderer's output: an ordered plan of steps, each with the Kubernetes objects it needs.

The operator walks a :class:`Plan` step by step (creating ``shared`` objects first, then each step's
objects when the step before it succeeded); ``ftctl render`` dumps all of it; ``ftctl run --local`` uses the
same LLaMA-Factory configs with a :class:`PathResolver` that points at local folders. Keeping one plan for all
three is what makes "what GitOps renders is what the operator creates is what runs locally" true.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune_operator.api.types import FineTuneJob, StageSpec, VolumeRef

StepKind = Literal["download", "preflight", "train", "merge", "eval", "publish", "serve"]

#: Where every PersistentVolumeClaim is mounted in pods: ``/mnt/volumes/<claimName>``.
VOLUME_ROOT = "/mnt/volumes"
#: Where the generated configs (ConfigMap) are mounted in pods.
CONFIG_DIR = "/etc/finetune"


@dataclass(frozen=True)
class PathResolver:
    """Maps volumes to directories: mount points in pods, or local folders for ``ftctl run --local``."""

    volume_root: str = VOLUME_ROOT
    config_dir: str = CONFIG_DIR
    #: Explicit claim -> directory overrides (``--volume CLAIM=DIR``).
    claims: Mapping[str, str] = field(default_factory=dict)

    def claim_dir(self, claim: str) -> str:
        """Directory where ``claim`` is mounted."""
        if claim in self.claims:
            return self.claims[claim]
        return f"{self.volume_root.rstrip('/')}/{claim}"

    def path(self, ref: VolumeRef) -> str:
        """Directory or file that ``ref`` (claim + optional subPath) points at."""
        base = self.claim_dir(ref.claim_name)
        sub = (ref.sub_path or "").strip("/")
        return f"{base}/{sub}" if sub else base


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: download, a training stage, merge or serve."""

    #: ``download``, the training stage's name, ``merge`` or ``serve``.
    name: str
    kind: StepKind
    #: ``download``, the training stage type (sft, dpo, ...), ``merge`` or ``serve``.
    type: str
    #: Every object of this step in creation order; ``workload`` is one of them.
    objects: tuple[dict[str, Any], ...]
    #: The object whose status decides whether the step succeeded (Job, PyTorchJob, DeepSpeedJob, TrainJob, Deployment).
    workload: dict[str, Any]
    #: Directory this step writes (container path), if any.
    output_path: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything a FineTuneJob becomes."""

    #: Objects created before the first step (ConfigMaps with the generated configs).
    shared: tuple[dict[str, Any], ...]
    steps: tuple[Step, ...]
    #: What ``status.outputs`` reports once the pipeline is done (container paths; endpoint when serving).
    outputs: dict[str, Any]

    def objects(self) -> list[dict[str, Any]]:
        """All objects in creation order."""
        out = list(self.shared)
        for step in self.steps:
            out.extend(step.objects)
        return out

    def step(self, name: str) -> Step:
        """The step called ``name`` (KeyError if there is none)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class StageInput:
    """Everything a training backend (:mod:`finetune_operator.backends`) needs to build one stage's objects."""

    job: FineTuneJob
    stage: StageSpec
    image: str
    #: ServiceAccount of the pod that reports progress (rank 0); the others mount no token.
    service_account: str
    #: Pod-level retries (``spec.retries``, or 0 when the operator retries by re-creating).
    backoff_limit: int
    resolver: PathResolver = field(default_factory=PathResolver)

    @property
    def nodes(self) -> int:
        return self.stage.resources.nodes if self.stage.resources else 1

    @property
    def gpus_per_node(self) -> int:
        return self.stage.resources.gpus_per_node if self.stage.resources else 1

    @property
    def nproc_per_node(self) -> int:
        """Processes per node: one per GPU, at least one (CPU)."""
        return max(self.gpus_per_node, 1)
