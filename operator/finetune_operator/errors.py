"""The exception hierarchy of finetune-operator.

::

    FineTuneError                 base of everything we raise on purpose
    ├── SpecError                 the FineTuneJob is invalid; carries every FieldError at once
    ├── RenderError               a valid spec that cannot be rendered (should not happen: a bug)
    └── WorkerError               a pipeline step failed in a worker; has an exit code a user can act on
        ├── DataError             a dataset file is missing or unreadable         (exit 3)
        ├── ModelNotFoundError    the base model is not where the spec says       (exit 4)
        ├── DownloadError         the hub download failed                         (exit 5)
        ├── OutOfMemoryError      training ran out of (GPU) memory                (exit 6)
        ├── TrainingError         LLaMA-Factory failed for another reason         (exit 7)
        ├── EvaluationError       the evaluation of the candidate model failed    (exit 9)
        ├── PublishError          publishing to a destination failed              (exit 10)
        ├── GateFailed            the promotion gate refused the new model        (exit 11)
        └── WillNotFitError       preflight: a stage will not fit its GPUs        (exit 12)

Why a hierarchy: the CLI maps SpecError to exit 1 and a readable list, the operator maps it to the
``InvalidSpec`` condition without retrying, and worker errors become pod exit codes and status messages.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem with a spec: where (``spec.stages[1].datasets[0]``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class FineTuneError(Exception):
    """Base class of every error finetune-operator raises on purpose."""


class SpecError(FineTuneError):
    """An invalid FineTuneJob. ``errors`` lists every problem found, each with its field path."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.errors)
        head = f"invalid FineTuneJob: {n} error{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  - {e}" for e in self.errors)])


class RenderError(FineTuneError):
    """A spec passed validation but could not be rendered."""


class WorkerError(FineTuneError):
    """A worker step failed. ``exit_code`` is what the pod exits with (so it shows in the Job status)."""

    exit_code = 1


class DataError(WorkerError):
    """A dataset file is missing, empty or unreadable."""

    exit_code = 3


class ModelNotFoundError(WorkerError):
    """The base model is not on the volume."""

    exit_code = 4


class DownloadError(WorkerError):
    """Downloading the model from the hub failed."""

    exit_code = 5


class OutOfMemoryError(WorkerError):
    """Training ran out of memory."""

    exit_code = 6


class TrainingError(WorkerError):
    """LLaMA-Factory exited with an error."""

    exit_code = 7


class EvaluationError(WorkerError):
    """The evaluation failed (bad held-out data, a model that cannot load, LLaMA-Factory error)."""

    exit_code = 9


class PublishError(WorkerError):
    """Publishing the model to a destination failed (bad destination, credentials, network)."""

    exit_code = 10


class GateFailed(WorkerError):
    """The promotion gate refused the new model: it is not served or published (the old one stays)."""

    exit_code = 11


class WillNotFitError(WorkerError):
    """Preflight: a stage's estimated per-GPU peak exceeds its GPU's memory."""

    exit_code = 12
