"""The documented output layout, computed through a :class:`~finetune_operator.render.plan.PathResolver`.

::

    <model>  = <root of model.volume.claimName>/<model.volume.subPath>
    <out>    = <root of output.volume.claimName>/<output.volume.subPath or ''>
    <out>/<job>/<stage>/     one folder per training stage (checkpoints, adapter or full weights)
    <out>/<job>/merged/      the merged model

With ``spec.runId`` every run writes its own folder, ``<out>/<job>/<runId>/<stage>/`` and
``<out>/<job>/<runId>/merged/``: a re-run must not find the previous run's completion markers (it would be a
no-op) nor overwrite the model the vLLM Deployment still serves while the new one trains.

In pods the claim roots are ``/mnt/volumes/<claimName>``; ``ftctl run --local`` passes a resolver with local
folders instead, so both run the very same LLaMA-Factory configs.
"""

from __future__ import annotations

from finetune_operator.api.types import FineTuneJob
from finetune_operator.render.plan import PathResolver

#: Folder of the merged model under ``<out>/<job>/``. Stage names may not take it (validation rejects them).
MERGED_DIR = "merged"


def model_dir(job: FineTuneJob, resolver: PathResolver) -> str:
    """The base model folder (where the download step writes it, or where it already is)."""
    return resolver.path(job.spec.model.volume)


def job_output_dir(job: FineTuneJob, resolver: PathResolver) -> str:
    """``<out>/<job>``: everything this FineTuneJob writes."""
    return f"{resolver.path(job.spec.output.volume)}/{job.name}"


def run_output_dir(job: FineTuneJob, resolver: PathResolver) -> str:
    """``<out>/<job>/<runId>`` (``<out>/<job>`` without a runId): everything this run writes."""
    base = job_output_dir(job, resolver)
    return f"{base}/{job.spec.run_id}" if job.spec.run_id else base


def stage_output_dir(job: FineTuneJob, stage: str, resolver: PathResolver) -> str:
    """``<out>/<job>[/<runId>]/<stage>``: a training stage's checkpoints and final weights."""
    return f"{run_output_dir(job, resolver)}/{stage}"


def merged_dir(job: FineTuneJob, resolver: PathResolver) -> str:
    """``<out>/<job>[/<runId>]/merged``: the merged model."""
    return f"{run_output_dir(job, resolver)}/{MERGED_DIR}"


def dataset_file(job: FineTuneJob, name: str, resolver: PathResolver) -> str:
    """Absolute path of the data file (or folder) of dataset ``name``."""
    for ds in job.spec.datasets:
        if ds.name == name:
            return resolver.path(ds.volume)
    raise KeyError(name)
