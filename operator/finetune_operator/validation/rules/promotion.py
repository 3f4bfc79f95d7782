"""Evaluation, promotion gate and publishing: what must hold before any training starts.

Decisions:

- The gate's metric must be one the configured evaluation produces (``eval_loss`` needs ``loss``,
  ``predict_*`` needs ``generation``, ``benchmark_*`` needs ``benchmark``): a gate on a metric that never
  appears would fail every run after hours of training, so it is refused up front.
- Held-out data is plain (not ``ranking``): LLaMA-Factory evaluates and predicts with the SFT workflow.
- Publishing the merged model needs ``merge.enabled``; publishing adapters needs a LoRA last stage.
- Credentials come in pairs (S3 key id + secret, registry user + password) or not at all (ambient
  credentials, anonymous push); half a pair is a typo, not a choice.
"""

from __future__ import annotations

from collections.abc import Iterator

from finetune_operator.api.types import ADAPTER_METHODS
from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context
from finetune_operator.validation.registry import rule
from finetune_operator.validation.rules.arguments import RESERVED_ARGS, SECRET_ARGS
from finetune_operator.validation.words import hint, join

#: Metrics of LLaMA-Factory's generation evaluation (``compute_metrics`` with ``predict_with_generate``).
GENERATION_METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")
#: Categories of LLaMA-Factory's multiple-choice evaluator (MMLU/CMMLU/C-Eval) besides the average.
BENCHMARK_METRICS = (
    "benchmark_average",
    "benchmark_stem",
    "benchmark_social_sciences",
    "benchmark_humanities",
    "benchmark_other",
)
#: Arguments of the evaluation that the operator sets from ``spec.evaluate``.
EVAL_OWNED_ARGS = {
    "do_train": "the operator (evaluation never trains)",
    "do_eval": "spec.evaluate.loss",
    "do_predict": "spec.evaluate.generation",
    "predict_with_generate": "spec.evaluate.generation",
    "eval_dataset": "spec.evaluate.datasets",
    "max_samples": "spec.evaluate.maxSamples",
    "task": "spec.evaluate.benchmark.task",
    "task_dir": "spec.evaluate.benchmark.volume",
    "save_dir": "the operator",
    "n_shot": "spec.evaluate.benchmark.nShot",
    "lang": "spec.evaluate.benchmark.lang",
}


def metrics_produced(ctx: Context) -> set[str]:
    """Every metric name the configured evaluation can report."""
    ev = ctx.spec.evaluate
    if ev is None:
        return set()
    out: set[str] = set()
    if ev.datasets and ev.loss:
        out.add("eval_loss")
    if ev.datasets and ev.generation:
        out.update(GENERATION_METRICS)
    if ev.benchmark is not None:
        out.update(BENCHMARK_METRICS)
    return out


@rule
def evaluate_datasets(ctx: Context) -> Iterator[FieldError]:
    ev = ctx.spec.evaluate
    if ev is None:
        return
    declared = ctx.datasets_by_name()
    for j, name in enumerate(ev.datasets or []):
        ds = declared.get(name)
        if ds is None:
            yield FieldError(
                f"spec.evaluate.datasets[{j}]",
                f"dataset {name!r} is not declared in spec.datasets{hint(name, declared)}",
            )
        elif ds.ranking:
            yield FieldError(
                f"spec.evaluate.datasets[{j}]",
                f"dataset {name!r} is ranking (preference pairs): held-out evaluation needs plain data",
            )
    if (ev.loss or ev.generation) and not ev.datasets and ev.benchmark is None:
        yield FieldError("spec.evaluate.datasets", "name at least one held-out dataset (or set a benchmark)")
    if not (ev.datasets and (ev.loss or ev.generation)) and ev.benchmark is None:
        yield FieldError(
            "spec.evaluate", "nothing to evaluate: enable loss or generation with datasets, or set a benchmark"
        )
    if ev.resources is not None and ev.resources.nodes > 1:
        yield FieldError("spec.evaluate.resources.nodes", "evaluation runs on one node")


@rule
def evaluate_args(ctx: Context) -> Iterator[FieldError]:
    ev = ctx.spec.evaluate
    if ev is None:
        return
    for key in ev.args:
        path = join("spec.evaluate.args", key)
        if key in SECRET_ARGS:
            yield FieldError(path, "credentials must not be in args (they would be stored in a ConfigMap)")
        elif key in EVAL_OWNED_ARGS:
            yield FieldError(path, f"{key} is set by the operator: use {EVAL_OWNED_ARGS[key]}")
        elif key in RESERVED_ARGS:
            yield FieldError(path, f"{key} is set by the operator: use {RESERVED_ARGS[key]}")
        elif key not in ctx.lf.arguments:
            yield FieldError(path, f"unknown LLaMA-Factory argument {key!r}{hint(key, ctx.lf.arguments)}")


@rule
def gate_metric_is_produced(ctx: Context) -> Iterator[FieldError]:
    gate = ctx.spec.gate
    if gate is None or gate.metric is None:
        return
    if ctx.spec.evaluate is None:
        yield FieldError("spec.gate", "a gate needs spec.evaluate (it gates on the evaluation's metrics)")
        return
    produced = metrics_produced(ctx)
    if gate.metric not in produced:
        have = ", ".join(sorted(produced)) or "none"
        yield FieldError(
            "spec.gate.metric",
            f"the evaluation does not produce {gate.metric!r} (it produces: {have}){hint(gate.metric, produced)}",
        )
    if gate.threshold is None and not gate.no_worse_than_serving:
        yield FieldError("spec.gate", "set a threshold and/or noWorseThanServing: true")


@rule
def publish_artifact(ctx: Context) -> Iterator[FieldError]:
    pub = ctx.spec.publish
    if pub is None:
        return
    artifact = pub.artifact or ("merged" if ctx.spec.merge.enabled else "adapters")
    if artifact == "merged" and not ctx.spec.merge.enabled:
        yield FieldError("spec.publish.artifact", "publishing the merged model needs spec.merge.enabled: true")
    if artifact == "adapters":
        stages = ctx.stages()
        last = stages[-1][1] if stages else None
        if last is None or last.method not in ADAPTER_METHODS:
            yield FieldError(
                "spec.publish.artifact",
                "publishing adapters needs a lora or qlora last stage "
                "(set merge.enabled: true to publish the merged model)",
            )
        elif len(ctx.chain()[0].adapters) > 1:
            yield FieldError(
                "spec.publish.artifact",
                "the stages stack several LoRA adapters, which are one model "
                "only together: set merge.enabled: true to publish the merged model",
            )


@rule
def publish_destinations(ctx: Context) -> Iterator[FieldError]:
    pub = ctx.spec.publish
    if pub is None:
        return
    seen: set[str] = set()
    for j, dest in enumerate(pub.destinations or []):
        if dest is None:
            continue
        path = f"spec.publish.destinations[{j}]"
        if dest.name in seen:
            yield FieldError(f"{path}.name", f"destination name {dest.name!r} is used twice")
        seen.add(dest.name or "")
        kinds = [k for k in ("huggingface", "s3", "oci") if getattr(dest, k) is not None]
        if len(kinds) != 1:
            yield FieldError(
                path, "set exactly one of huggingface, s3 or oci" + (f" (found {', '.join(kinds)})" if kinds else "")
            )
        if dest.s3 is not None and (dest.s3.access_key_id_secret_ref is None) != (
            dest.s3.secret_access_key_secret_ref is None
        ):
            yield FieldError(
                f"{path}.s3",
                "set both accessKeyIdSecretRef and secretAccessKeySecretRef, or neither (ambient credentials)",
            )
        if dest.oci is not None and (dest.oci.username_secret_ref is None) != (dest.oci.password_secret_ref is None):
            yield FieldError(
                f"{path}.oci", "set both usernameSecretRef and passwordSecretRef, or neither (anonymous push)"
            )
