"""LLaMA-Factory configuration: ``dataset_info.json``, one training config per stage, the export (merge) config.

These builders take a :class:`~finetune_operator.render.plan.PathResolver` and return plain dicts, so that the
operator (paths under ``/mnt/volumes`` and ``/etc/finetune``) and ``ftctl run --local`` (local folders) run
byte-for-byte the same configuration; only the paths differ.

Stage chaining: each stage starts from the result of the stage it names (``startFrom``) or, by default, of the
nearest earlier stage that is not ``rm``; the walk itself is :func:`finetune_operator.render.chain.walk`, which
validation uses too:

* LoRA after LoRA stacks adapters: ``adapter_name_or_path`` = the earlier adapters (in order) and
  ``create_new_adapter: true``. LLaMA-Factory merges the earlier adapters into the weights in memory and trains
  a fresh adapter on top; the merge step later applies base + every adapter in the same order.
* A LoRA stage that LLaMA-Factory cannot stack on (``qlora``, where the base is 4-bit, or ZeRO-3, where the
  weights are partitioned) *continues* the single earlier adapter instead: LLaMA-Factory rejects
  ``create_new_adapter`` there and loads the adapter trainable. Its output therefore replaces the earlier
  adapter in the chain (merging both would apply the first one twice). More than one earlier adapter is
  impossible for such a stage (:class:`RenderError`).
* After a full/freeze stage the next stage's model is that stage's output and the adapter chain restarts.
  A full/freeze stage after LoRA stages is impossible without an intermediate merge (LLaMA-Factory: "Adapter is
  only valid for the LoRA method") and raises :class:`RenderError`.
* ``qlora`` = LoRA with ``quantization_bit: 4``. The merge loads the base *unquantized* (LLaMA-Factory cannot
  merge into a quantized model), which is the standard QLoRA export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.types import ADAPTER_METHODS, DatasetSpec, FineTuneJob, ModelRef, StageSpec
from finetune_operator.errors import RenderError
from finetune_operator.render import chain as walker
from finetune_operator.render import paths, tracking
from finetune_operator.render.plan import PathResolver

#: Defaults for every training config; ``stage.args`` overrides them.
DEFAULT_TRAIN_ARGS: dict[str, Any] = {
    "logging_steps": 10,
    # No wandb/tensorboard unless asked: pods have no credentials and no network to report to.
    "report_to": "none",
    # Long tokenisation of big datasets on rank 0 must not trip the NCCL/gloo watchdog on other ranks.
    "ddp_timeout": 180000000,
}

#: Keys the renderer owns: they are always set from the spec and win over ``stage.args``
#: (validation rejects them in ``args`` with a clear message; this is the second line of defence).
OWNED_TRAIN_KEYS: frozenset[str] = frozenset(
    {
        "stage",
        "do_train",
        "model_name_or_path",
        "adapter_name_or_path",
        "create_new_adapter",
        "finetuning_type",
        "template",
        "dataset",
        "dataset_dir",
        "output_dir",
        "deepspeed",
        "quantization_bit",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "export_dir",
        "reward_model",
        "reward_model_type",
        "reward_model_adapters",
        "ref_model",
        "ref_model_adapters",
        "media_dir",
    }
)

#: Quantisation used by the ``qlora`` method (bitsandbytes NF4, LLaMA-Factory's default method).
QLORA_BITS = 4


def _lf_method(stage: StageSpec) -> str:
    return "lora" if stage.method in ADAPTER_METHODS else stage.method


@dataclass(frozen=True)
class StageInput:
    """What one training stage starts from, and where it writes."""

    model: str
    """``model_name_or_path``: the base model, or the output of the last full/freeze stage."""
    adapters: tuple[str, ...]
    """``adapter_name_or_path``: earlier adapters, in order (empty: none)."""
    create_new_adapter: bool
    """Train a fresh adapter on top of ``adapters`` (False: continue the single earlier adapter)."""
    output_dir: str
    """The stage's output folder."""


@dataclass(frozen=True)
class Chain:
    """The result of walking the stages: each stage's input, and what the pipeline ends with."""

    stages: dict[str, StageInput]
    model: str
    """The full model the final adapters apply to (base, or the last full/freeze stage's output)."""
    adapters: tuple[str, ...]
    """Adapters to apply to ``model``, in order (empty when the last stage was full/freeze)."""
    lora_ranks: tuple[int, ...]
    """LoRA rank of each of ``adapters`` (for vLLM's ``--max-lora-rank``)."""
    results: dict[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    """Each stage's result: (model, adapters), for the models a stage names (reward model, reference)."""


def chain(job: FineTuneJob, resolver: PathResolver) -> Chain:
    """Walk ``spec.stages`` (:func:`finetune_operator.render.chain.walk`) and give each stage its paths."""
    stages = job.spec.stages
    walked = walker.walk(stages, job.spec.merge.stage)
    if walked.problems:
        raise RenderError(_problem_text(stages, walked.problems[0]))
    base = paths.model_dir(job, resolver)
    out = [paths.stage_output_dir(job, stage.name, resolver) for stage in stages]

    def model(index: int | None) -> str:
        return base if index is None else out[index]

    inputs = {
        stages[link.index].name: StageInput(
            model=model(link.base),
            adapters=tuple(out[a] for a in link.adapters),
            create_new_adapter=link.create_new_adapter,
            output_dir=out[link.index],
        )
        for link in walked.links
    }
    return Chain(
        stages=inputs,
        model=model(walked.base),
        adapters=tuple(out[a] for a in walked.adapters),
        lora_ranks=walked.ranks,
        results={
            stages[i].name: (model(r.base), tuple(out[a] for a in r.adapters)) for i, r in enumerate(walked.results)
        },
    )


def _problem_text(stages: list[StageSpec], problem: walker.ChainProblem) -> str:
    stage = stages[problem.index]
    if problem.problem is walker.Problem.BAD_REFERENCE:
        return f"stage {stage.name!r}: {problem.message}"
    if problem.problem is walker.Problem.FULL_AFTER_LORA:
        return (
            f"stage {stage.name!r} ({stage.method}) follows LoRA stage(s): a full/freeze stage cannot "
            "start from adapters; make it the first stage or use a LoRA method"
        )
    return (
        f"stage {stage.name!r} ({stage.method}"
        f"{', ZeRO-3' if stage.method != 'qlora' else ''}) can only continue a single earlier "
        f"adapter, but {problem.stacked} are stacked before it; enable merge between them or use "
        "lora without ZeRO-3"
    )


#: LLaMA-Factory's own column/tag defaults (``llamafactory.data.parser.DatasetAttr``). LF applies them only
#: when ``columns``/``tags`` are absent: once a ``columns`` block exists, every column it omits becomes None.
#: The API promises "omitted ones take LLaMA-Factory's defaults", so a partial block is completed here.
LF_DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
LF_DEFAULT_TAGS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


def _dataset_entry(ds: DatasetSpec, resolver: PathResolver) -> dict[str, Any]:
    entry: dict[str, Any] = {
        # Absolute: os.path.join(dataset_dir, "/abs") == "/abs", so dataset_dir can be the read-only config dir.
        "file_name": resolver.path(ds.volume),
        "formatting": ds.formatting,
    }
    if ds.ranking:
        entry["ranking"] = True
    if ds.columns is not None:
        cols = ds.columns.model_dump(exclude_none=True)
        if cols:
            entry["columns"] = {**LF_DEFAULT_COLUMNS[ds.formatting], **cols}
    if ds.tags is not None:
        tags = ds.tags.model_dump(exclude_none=True)
        if tags:
            entry["tags"] = {**LF_DEFAULT_TAGS, **tags}
    return entry


def dataset_info(job: FineTuneJob, resolver: PathResolver) -> dict[str, Any]:
    """``dataset_info.json`` exactly in LLaMA-Factory's format (snake_case ``columns``/``tags`` keys)."""
    return {ds.name: _dataset_entry(ds, resolver) for ds in job.spec.datasets}


def _stage(job: FineTuneJob, name: str) -> StageSpec:
    for s in job.spec.stages:
        if s.name == name:
            return s
    raise RenderError(f"no stage named {name!r}")


def deepspeed_config_path(stage: str, resolver: PathResolver) -> str:
    """Where a stage's DeepSpeed JSON is (``<config dir>/ds_<stage>.json``)."""
    return f"{resolver.config_dir.rstrip('/')}/ds_{stage}.json"


def train_config(
    job: FineTuneJob, stage_name: str, resolver: PathResolver, *, stage_chain: Chain | None = None
) -> dict[str, Any]:
    """The ``llamafactory-cli train`` config of one stage (``<stage>.yaml``)."""
    stage = _stage(job, stage_name)
    ch = stage_chain or chain(job, resolver)
    inp = ch.stages[stage.name]
    cfg: dict[str, Any] = dict(DEFAULT_TRAIN_ARGS)
    cfg.update({k: v for k, v in stage.args.items() if k not in OWNED_TRAIN_KEYS})
    cfg.update(
        {
            "stage": stage.type,
            "do_train": True,
            "model_name_or_path": inp.model,
            "finetuning_type": _lf_method(stage),
            "template": job.spec.model.template,
            "dataset": ",".join(stage.datasets),
            "dataset_dir": resolver.config_dir,
            "output_dir": inp.output_dir,
        }
    )
    if inp.adapters:
        cfg["adapter_name_or_path"] = ",".join(inp.adapters)
        if inp.create_new_adapter:
            cfg["create_new_adapter"] = True
    if stage.method in ADAPTER_METHODS:
        lora = stage.lora
        cfg["lora_rank"] = walker.lora_of(stage).rank
        if lora is not None:
            if lora.alpha is not None:
                cfg["lora_alpha"] = lora.alpha
            cfg["lora_dropout"] = lora.dropout
            target = lora.target
            cfg["lora_target"] = ",".join(target) if isinstance(target, list) else target
        else:
            cfg["lora_target"] = walker.lora_of(stage).target
    if stage.method == "qlora":
        cfg["quantization_bit"] = QLORA_BITS
    if stage.deepspeed is not None:
        cfg["deepspeed"] = deepspeed_config_path(stage.name, resolver)
    cfg.update(tracking.train_args(job, stage.name))
    media = media_dir(job, stage, resolver)
    if media is not None:
        cfg["media_dir"] = media
    if stage.reward_model is not None:
        cfg.update(_reward_model(stage, inp, ch, resolver))
    if stage.reference is not None:
        model, adapters = _model_ref(stage.reference, ch, resolver)
        cfg["ref_model"] = model
        if adapters:
            cfg["ref_model_adapters"] = ",".join(adapters)
    return cfg


def media_dir(job: FineTuneJob, stage: StageSpec, resolver: PathResolver) -> str | None:
    """LLaMA-Factory's ``media_dir`` of a stage: the ``media`` folder of its datasets (validation makes sure
    they share one: LLaMA-Factory has one per run). None without multimodal media folders."""
    by_name = {d.name: d for d in job.spec.datasets}
    folders = {resolver.path(m) for n in stage.datasets if (m := by_name[n].media) is not None}
    if len(folders) > 1:
        raise RenderError(f"stage {stage.name!r}: its datasets have different media folders")
    return folders.pop() if folders else None


def _model_ref(ref: ModelRef, ch: Chain, resolver: PathResolver) -> tuple[str, tuple[str, ...]]:
    """(model, adapters) of a model a stage names: an earlier stage's result, or a folder on a volume."""
    if ref.volume is not None:
        return resolver.path(ref.volume), ()
    if ref.stage is None or ref.stage not in ch.results:
        raise RenderError(f"unknown stage {ref.stage!r} in a model reference")
    return ch.results[ref.stage]


def _reward_model(stage: StageSpec, inp: StageInput, ch: Chain, resolver: PathResolver) -> dict[str, Any]:
    """PPO's reward model. A LoRA ``rm`` stage trained from exactly what this LoRA policy starts from is loaded
    as a second adapter on the policy's own weights (``reward_model_type: lora``: no second model in memory);
    anything else is loaded as a separate model (``full``) with its adapters (``reward_model_adapters``)."""
    ref = stage.reward_model
    if ref is None:
        return {}
    model, adapters = _model_ref(ref, ch, resolver)
    if (
        ref.stage is not None
        and stage.method in ADAPTER_METHODS
        and (inp.create_new_adapter or not inp.adapters)
        and adapters
        and (model, adapters[:-1]) == (inp.model, inp.adapters)
    ):
        return {"reward_model": adapters[-1], "reward_model_type": "lora"}
    out: dict[str, Any] = {"reward_model": model, "reward_model_type": "full"}
    if adapters:
        out["reward_model_adapters"] = ",".join(adapters)
    return out


def export_config(job: FineTuneJob, resolver: PathResolver, *, stage_chain: Chain | None = None) -> dict[str, Any]:
    """The ``llamafactory-cli export`` config (``merge.yaml``): the model + every adapter, in order.

    When the pipeline ends with a full model (no adapters) the export re-shards it into ``exportSize`` GB
    safetensors shards, so ``merged/`` is always the servable result when merge is enabled.
    """
    ch = stage_chain or chain(job, resolver)
    merge = job.spec.merge
    cfg: dict[str, Any] = {
        "model_name_or_path": ch.model,
        "template": job.spec.model.template,
        "finetuning_type": "lora" if ch.adapters else "full",
        "export_dir": paths.merged_dir(job, resolver),
        "export_size": merge.export_size,
        "export_device": merge.export_device,
        # safetensors, which vLLM and transformers load without pickle.
        "export_legacy_format": False,
    }
    if ch.adapters:
        cfg["adapter_name_or_path"] = ",".join(ch.adapters)
    return cfg
