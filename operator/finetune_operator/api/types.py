"""The FineTuneJob API (``finetune.dev/v1alpha1``) as pydantic v2 models.

These models are the single source of truth: the CRD in ``crds/`` is generated from them (``ftctl crd``),
the renderer and the operator consume them, and their field descriptions become ``kubectl explain`` text.
Fields are camelCase on the wire (Kubernetes convention) and snake_case in Python.

Only *shape* rules live here (types, enums, bounds, unknown fields). Rules that need the whole object
(dataset names declared, ranking data for preference stages, derived name lengths, LLaMA-Factory argument
checks) live in :mod:`finetune_operator.validation`, which reports every problem at once with its path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from finetune_operator.api.checkpointing import DURATION_PATTERN, MIN_GRACE_SECONDS, parse_duration

# Re-exported: older imports read the patterns from here; api.patterns is their one home.
from finetune_operator.api.patterns import DATASET_NAME_PATTERN as DATASET_NAME_PATTERN
from finetune_operator.api.patterns import DNS_LABEL_PATTERN as DNS_LABEL_PATTERN
from finetune_operator.api.patterns import DNS_SUBDOMAIN_PATTERN as DNS_SUBDOMAIN_PATTERN
from finetune_operator.api.patterns import ENV_NAME_PATTERN, IMAGE_PATTERN, SERVED_MODEL_NAME_PATTERN

#: The training backends: exactly the names of finetune_operator.backends.REGISTRY (checked when that loads).
Backend = Literal["job", "pytorchjob", "deepspeedjob", "trainjob"]
Hub = Literal["huggingface", "modelscope"]
Formatting = Literal["sharegpt", "alpaca"]
StageType = Literal["pt", "sft", "rm", "ppo", "dpo", "kto"]
Method = Literal["full", "freeze", "lora", "qlora"]

#: Stages trained on preference pairs (``ranking: true`` datasets); the others need plain data.
#: kto is special-cased in validation: it takes plain data with a ``ktoTag`` column.
PREFERENCE_STAGES: frozenset[str] = frozenset({"rm", "dpo"})
ADAPTER_METHODS: frozenset[str] = frozenset({"lora", "qlora"})


class _Model(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (a typo must not be silently ignored)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
        use_attribute_docstrings=True,
    )


class VolumeRef(_Model):
    """A PersistentVolumeClaim, and optionally a path inside it."""

    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of a PersistentVolumeClaim in the FineTuneJob's namespace."""
    sub_path: str | None = Field(default=None, max_length=1024)
    """Relative path inside the volume (a folder for models and outputs, a file for datasets)."""


class SecretKeyRef(_Model):
    """A key of a Secret in the FineTuneJob's namespace. Its value only ever reaches pods as an env var."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret."""


class Toleration(_Model):
    """A pod toleration (as in the Pod API)."""

    key: str | None = Field(default=None, max_length=317)
    """Taint key."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: str | None = Field(default=None, max_length=63)
    """Taint value (with Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect; all effects when omitted."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class NodeSelectorRequirement(_Model):
    """A node label requirement (as in the Pod API)."""

    key: str = Field(min_length=1, max_length=317)
    """Node label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """How the label is compared with ``values``."""
    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)
    """Values (none with Exists/DoesNotExist, one integer with Gt/Lt)."""


class NodeSelectorTerm(_Model):
    """Requirements that must all hold (as in the Pod API)."""

    match_expressions: list[NodeSelectorRequirement] = Field(min_length=1, max_length=32)
    """Node label requirements."""


class NodeSelector(_Model):
    """Terms of which at least one must hold."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=16)
    """Alternatives."""


class PreferredSchedulingTerm(_Model):
    """A weighted preference for nodes."""

    weight: int = Field(ge=1, le=100)
    """Weight 1-100."""
    preference: NodeSelectorTerm
    """The preferred nodes."""


class NodeAffinity(_Model):
    """Node affinity (as in the Pod API)."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pod may run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=16
    )
    """Nodes the pod prefers."""


class Affinity(_Model):
    """Pod affinity rules; node affinity is what placing training, merge and serving needs."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""


class StepScheduling(_Model):
    """Scheduling of one step's pods, merged over ``spec.scheduling``: ``nodeSelector`` keys override the job's,
    ``tolerations`` are added to the job's, ``affinity`` and ``priorityClassName`` replace the job's."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels this step's pods require (over the job's)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations added to the job's."""
    affinity: Affinity | None = None
    """Affinity of this step's pods (replaces the job's)."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of this step's pods (replaces the job's)."""


class ModelSpec(_Model):
    """The base model."""

    source: str | None = Field(default=None, max_length=512)
    """Hub id to download once into ``volume`` (e.g. ``Qwen/Qwen2-7B-Instruct``). Omit when the model is
    already on the volume."""
    hub: Hub = "huggingface"
    """Where ``source`` is downloaded from: ``huggingface`` or ``modelscope``."""
    revision: str | None = Field(default=None, max_length=256)
    """Hub revision (branch, tag or commit) to download; the hub's default branch when omitted."""
    volume: VolumeRef
    """Where the model lives (or is downloaded to)."""
    template: str = Field(min_length=1, max_length=64)
    """LLaMA-Factory chat template (``qwen``, ``llama3``, ...)."""
    token_secret_ref: SecretKeyRef | None = None
    """Hub token for gated models, passed to the download pod as an environment variable only."""
    download_scheduling: StepScheduling | None = None
    """Scheduling of the download pod, over ``spec.scheduling``."""


class DatasetColumns(_Model):
    """Column names in the data file (LLaMA-Factory's ``columns``); omitted ones take LLaMA-Factory's defaults."""

    prompt: str | None = Field(default=None, max_length=128)
    """alpaca: instruction column."""
    query: str | None = Field(default=None, max_length=128)
    """alpaca: input column."""
    response: str | None = Field(default=None, max_length=128)
    """alpaca: output column."""
    history: str | None = Field(default=None, max_length=128)
    """alpaca: history column."""
    messages: str | None = Field(default=None, max_length=128)
    """sharegpt: messages column."""
    system: str | None = Field(default=None, max_length=128)
    """System prompt column."""
    tools: str | None = Field(default=None, max_length=128)
    """sharegpt: tool description column."""
    chosen: str | None = Field(default=None, max_length=128)
    """Preference data: chosen answer column."""
    rejected: str | None = Field(default=None, max_length=128)
    """Preference data: rejected answer column."""
    kto_tag: str | None = Field(default=None, max_length=128)
    """KTO data: boolean label column."""
    images: str | None = Field(default=None, max_length=128)
    """Multimodal data: column with the image file(s) of each sample (paths relative to ``media``)."""
    videos: str | None = Field(default=None, max_length=128)
    """Multimodal data: column with the video file(s) (or lists of frame images) of each sample."""
    audios: str | None = Field(default=None, max_length=128)
    """Multimodal data: column with the audio file(s) of each sample."""


class DatasetTags(_Model):
    """sharegpt role/content tags (LLaMA-Factory's ``tags``)."""

    role_tag: str | None = Field(default=None, max_length=128)
    """Key holding the role in each message."""
    content_tag: str | None = Field(default=None, max_length=128)
    """Key holding the text in each message."""
    user_tag: str | None = Field(default=None, max_length=128)
    """Role value of user messages."""
    assistant_tag: str | None = Field(default=None, max_length=128)
    """Role value of assistant messages."""
    observation_tag: str | None = Field(default=None, max_length=128)
    """Role value of tool results."""
    function_tag: str | None = Field(default=None, max_length=128)
    """Role value of tool calls."""
    system_tag: str | None = Field(default=None, max_length=128)
    """Role value of system messages."""


class DatasetSpec(_Model):
    """A dataset file on a volume, described the way LLaMA-Factory's ``dataset_info.json`` does."""

    name: str = Field(min_length=1, max_length=63, pattern=DATASET_NAME_PATTERN)
    """Name that stages refer to."""
    volume: VolumeRef
    """Claim and path of the data file (json or jsonl) or folder."""
    formatting: Formatting = "alpaca"
    """``alpaca`` (default) or ``sharegpt``."""
    ranking: bool = False
    """Preference pairs (chosen/rejected) for rm and dpo stages."""
    columns: DatasetColumns | None = None
    """Column mapping; LLaMA-Factory's defaults when omitted."""
    tags: DatasetTags | None = None
    """sharegpt role/content tags; LLaMA-Factory's defaults when omitted."""
    media: VolumeRef | None = None
    """Folder of the images/videos/audios the data names: relative media paths resolve there (LLaMA-Factory's
    ``media_dir``; mounted read-only in training pods). The stages of multimodal data need a multimodal model
    and template (``qwen2_vl``, ``llava``, ...)."""


class OutputSpec(_Model):
    """Where checkpoints, adapters and the merged model are written: ``<claim>/<subPath>/<job>/<stage>/``
    (``<claim>/<subPath>/<job>/<runId>/<stage>/`` with ``spec.runId``)."""

    volume: VolumeRef
    """The output volume (ReadWriteMany when training spans several nodes)."""


class LoraSpec(_Model):
    """LoRA hyper-parameters (methods ``lora`` and ``qlora``)."""

    rank: int = Field(default=8, ge=1, le=1024)
    """LoRA rank (``lora_rank``)."""
    alpha: int | None = Field(default=None, ge=1, le=4096)
    """LoRA alpha (``lora_alpha``); LLaMA-Factory uses 2 x rank when omitted."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """LoRA dropout (``lora_dropout``)."""
    target: str | list[str] = Field(default="all")
    """Modules to adapt: ``all``, a comma-separated string or a list of module names."""


class DeepSpeedSpec(_Model):
    """DeepSpeed ZeRO configuration generated for the stage."""

    zero_stage: int = Field(default=2, ge=0, le=3)
    """ZeRO stage 0-3."""
    offload: bool = False
    """Offload optimizer state to CPU (and, with ZeRO-3, parameters too)."""


class ResourcesSpec(_Model):
    """Size of a stage: nodes, GPUs per node, and CPU/memory requests of each pod."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Number of nodes (pods); more than one runs as a PyTorchJob, DeepSpeedJob or TrainJob, or an Indexed Job."""
    gpus_per_node: int = Field(default=1, ge=0, le=64)
    """GPUs per pod (``nvidia.com/gpu``); 0 runs on CPU (tests, tiny models)."""
    cpu: str | None = Field(default=None, max_length=32)
    """CPU request and limit of each pod (a Kubernetes quantity)."""
    memory: str | None = Field(default=None, max_length=32)
    """Memory request and limit of each pod (a Kubernetes quantity)."""
    gpu_memory: str | None = Field(default=None, max_length=32)
    """Memory of one GPU (a Kubernetes quantity such as ``80Gi``) for the preflight estimate, when the
    ``nvidia.com/gpu.product`` node selector does not name a GPU the operator knows."""


class PreflightSpec(_Model):
    """The preflight step: a CPU-only pod that checks memory and data before any GPU workload exists."""

    mode: Literal["Enforce", "Warn", "Disabled"] = "Enforce"
    """``Enforce`` (default): a stage that will not fit its GPUs or whose data is unusable fails the job
    (reasons ``WillNotFit``, ``InvalidData``) before any GPU is requested. ``Warn``: the plan and a Warning
    event, then training starts anyway. ``Disabled``: no preflight step."""


class CheckpointSpec(_Model):
    """Checkpoints beyond LLaMA-Factory's ``save_steps``: on preemption, and on a clock."""

    every: str | None = Field(default=None, max_length=16, pattern=DURATION_PATTERN)
    """Also save a checkpoint whenever this much time has passed since the last one (``30m``, ``1h``,
    ``90s``): an alternative to ``args.save_steps`` whose time per step is hard to guess."""
    on_preemption: bool = True
    """On SIGTERM (preemption, eviction, a drained node) the trainer saves a checkpoint at the next step
    boundary and exits, so that the retry resumes from it; false stops at once (the last ``save_steps``
    checkpoint is resumed)."""
    termination_grace_period_seconds: int | None = Field(default=None, ge=MIN_GRACE_SECONDS, le=86400)
    """The training pods' ``terminationGracePeriodSeconds`` (60 when omitted): time to finish the step in
    flight and write the checkpoint. Size it to one step plus one checkpoint of your model."""

    @field_validator("every")
    @classmethod
    def _every_is_positive(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


class ModelRef(_Model):
    """A model a stage uses besides the one it trains: the result of an earlier stage, or a model on a volume.
    Exactly one of ``stage`` and ``volume``."""

    stage: str | None = Field(default=None, min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN)
    """Name of an earlier stage whose result is used (for ``rewardModel``: an ``rm`` stage)."""
    volume: VolumeRef | None = None
    """A full model folder on a volume (for ``rewardModel``: a model with a value head, as an ``rm`` stage
    with method full writes)."""


class StageSpec(_Model):
    """One training stage, run by ``llamafactory-cli train``."""

    name: str = Field(min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN)
    """Stage name (DNS label): used in child object names and output paths."""
    type: StageType
    """LLaMA-Factory stage: pt, sft, rm, ppo, dpo or kto (ORPO/SimPO: type dpo with ``args.pref_loss``)."""
    start_from: str | None = Field(default=None, min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN)
    """What the stage starts from: ``base`` (the base model) or the name of an earlier stage (its result:
    model plus adapters). Default: the nearest earlier stage that is not ``rm``, else the base model; an
    ``rm`` stage's reward model is never stacked into a later stage unless named here."""
    reward_model: ModelRef | None = None
    """ppo only (required there): the reward model, an earlier ``rm`` stage or a full model on a volume."""
    reference: ModelRef | None = None
    """ppo and dpo/kto: the frozen reference model. Default (LLaMA-Factory's): the model the stage starts
    from (for LoRA, the policy with its adapter disabled)."""
    datasets: list[str] = Field(min_length=1, max_length=32)
    """Names of entries of ``spec.datasets`` to train on."""
    method: Method = "lora"
    """Fine-tuning method: full, freeze, lora or qlora (LoRA on a 4-bit quantized base)."""
    lora: LoraSpec | None = None
    """LoRA settings (lora and qlora only)."""
    deepspeed: DeepSpeedSpec | None = None
    """Generate a DeepSpeed ZeRO config for this stage."""
    resources: ResourcesSpec | None = None
    """Nodes, GPUs, CPU and memory; one node with one GPU when omitted."""
    scheduling: StepScheduling | None = None
    """Scheduling of this stage's pods, over ``spec.scheduling``."""
    checkpoint: CheckpointSpec | None = None
    """Checkpoint on preemption (on by default) and every N minutes; the pods' grace period."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Any other LLaMA-Factory training argument (``learning_rate``, ``num_train_epochs``, ...). Arguments the
    operator owns (paths, model, dataset, stage, method, template, deepspeed) are rejected here."""


class MergeSpec(_Model):
    """Merge the base model and every LoRA adapter into one model (``llamafactory-cli export``)."""

    enabled: bool = False
    """Run the merge stage after training."""
    stage: str | None = Field(default=None, min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN)
    """The stage whose result is merged (and served): the last stage that is not ``rm`` when omitted."""
    export_size: int = Field(default=5, ge=1, le=100)
    """Shard size of the exported model in GB."""
    export_device: Literal["cpu", "auto"] = "cpu"
    """Device used for merging."""
    resources: ResourcesSpec | None = None
    """CPU/memory of the merge pod (GPUs are not needed with exportDevice cpu)."""
    scheduling: StepScheduling | None = None
    """Scheduling of the merge pod, over ``spec.scheduling``."""


class EnvVarSource(_Model):
    """Where an environment variable's value comes from: a key of a Secret (never a plain value in the spec)."""

    secret_key_ref: SecretKeyRef
    """The Secret key; the value reaches the container through ``valueFrom.secretKeyRef`` only."""


class BenchmarkSpec(_Model):
    """A multiple-choice benchmark in LLaMA-Factory's eval format (its evaluator: MMLU, CMMLU, C-Eval or your
    own task laid out the same way), read from a volume."""

    volume: VolumeRef
    """Folder holding the task folders (LLaMA-Factory's ``task_dir``)."""
    task: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
    """Task and split, as LLaMA-Factory names them (e.g. ``mmlu_test``)."""
    lang: Literal["en", "zh"] = "en"
    """Language of the prompt template."""
    n_shot: int = Field(default=5, ge=0, le=64)
    """Number of examples in each prompt."""


class EvaluateSpec(_Model):
    """Evaluate the candidate (merged model, or base + adapters) after training: held-out loss, generation
    metrics and/or a benchmark. Metrics go to ``status.stages[]``, ``status.outputs.metrics`` and the
    lineage file; predictions to ``<out>/<job>/[<runId>/]eval/``."""

    datasets: list[str] = Field(default_factory=list, max_length=16)
    """Held-out datasets (names of ``spec.datasets``) for ``loss`` and ``generation``."""
    loss: bool = True
    """Held-out loss (LLaMA-Factory ``do_eval``): metric ``eval_loss``."""
    generation: bool = False
    """Generate answers for the held-out data (``do_predict`` with ``predict_with_generate``): metrics
    ``predict_bleu-4``, ``predict_rouge-1``, ``predict_rouge-2``, ``predict_rouge-l``, and the predictions file
    ``generated_predictions.jsonl``."""
    max_samples: int | None = Field(default=None, ge=1, le=10_000_000)
    """Use at most this many examples of each dataset."""
    benchmark: BenchmarkSpec | None = None
    """A multiple-choice benchmark: metrics ``benchmark_average`` and ``benchmark_<category>`` (accuracy, %)."""
    resources: ResourcesSpec | None = None
    """Nodes, GPUs, CPU and memory of the evaluation pod (one node)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Other LLaMA-Factory arguments of the evaluation (``max_new_tokens``, ``per_device_eval_batch_size``,
    ...); the operator's own arguments are rejected as for stages."""


class GateSpec(_Model):
    """The promotion gate: the new model is served (and published) only if its metric passes every rule."""

    metric: str = Field(min_length=1, max_length=128)
    """Metric of the evaluation (``eval_loss``, ``predict_bleu-4``, ``predict_rouge-l``, ``benchmark_average``,
    ...)."""
    higher_is_better: bool | None = None
    """Direction of the metric; by default lower is better for losses and higher for everything else."""
    threshold: float | None = None
    """Absolute bound: the metric must be at most (lower is better) or at least (higher is better) this."""
    no_worse_than_serving: bool = False
    """Compare with the metric of the model serving now (recorded by the operator on its Deployment, never read
    from status); passes when nothing serves yet or the serving model was not evaluated with this metric."""
    margin: float = Field(default=0.0, ge=0.0)
    """How much worse than the serving model the new one may be (in the metric's units)."""


class HubDestination(_Model):
    """A Hugging Face-compatible hub repository (``huggingface_hub`` upload)."""

    repo_id: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$"
    )
    """``owner/name``; created (with ``private``) when missing."""
    private: bool = True
    """Visibility of a repository the operator creates."""
    revision: str = Field(default="main", min_length=1, max_length=256)
    """Branch to commit to."""
    endpoint: str | None = Field(default=None, max_length=512, pattern=r"^https?://[^\s]+$")
    """Hub URL; ``https://huggingface.co`` when omitted."""
    token_secret_ref: SecretKeyRef
    """Write token."""


class S3Destination(_Model):
    """A bucket of S3-compatible object storage (``boto3``); objects go to ``<prefix>/<file>``."""

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    """Bucket name (it must exist)."""
    prefix: str = Field(default="", max_length=512, pattern=r"^[^\s]*$")
    """Key prefix (a folder); empty for the bucket root."""
    endpoint_url: str | None = Field(default=None, max_length=512, pattern=r"^https?://[^\s]+$")
    """Endpoint of a non-AWS service (MinIO, Ceph, ...); AWS when omitted."""
    region: str | None = Field(default=None, max_length=64)
    """Region; ``us-east-1`` when omitted."""
    access_key_id_secret_ref: SecretKeyRef | None = None
    """Access key id; omit both keys to use the pod's ambient credentials (IRSA, workload identity)."""
    secret_access_key_secret_ref: SecretKeyRef | None = None
    """Secret access key."""


class OciDestination(_Model):
    """An OCI registry, as an ORAS artifact (media types in docs/publishing.md)."""

    reference: str = Field(
        min_length=1, max_length=512, pattern=r"^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
    )
    """``registry[:port]/repository:tag``."""
    insecure: bool = False
    """Plain HTTP instead of HTTPS (a registry inside the cluster without TLS)."""
    username_secret_ref: SecretKeyRef | None = None
    """User name; omit both for anonymous push."""
    password_secret_ref: SecretKeyRef | None = None
    """Password or token."""


class PublishDestination(_Model):
    """One copy of the model: exactly one of ``huggingface``, ``s3`` or ``oci``."""

    name: str = Field(min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN)
    """Name of the copy (in ``status.outputs.published``)."""
    huggingface: HubDestination | None = None
    """A hub repository."""
    s3: S3Destination | None = None
    """An S3 bucket."""
    oci: OciDestination | None = None
    """An OCI registry."""


class PublishSpec(_Model):
    """Copy the model (with its ``finetune-lineage.json``) out of the cluster after the gate passed."""

    artifact: Literal["merged", "adapters"] | None = None
    """What to publish: the merged model (default with merge enabled) or the LoRA adapters of the last stage."""
    destinations: list[PublishDestination] = Field(min_length=1, max_length=8)
    """Where to."""
    resources: ResourcesSpec | None = None
    """CPU and memory of the publishing pod."""


class EnvVar(_Model):
    """An environment variable: a plain ``value``, or ``valueFrom.secretKeyRef`` for anything secret."""

    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME_PATTERN)
    """Variable name."""
    value: str = Field(default="", max_length=4096)
    """Variable value (not with ``valueFrom``)."""
    value_from: EnvVarSource | None = None
    """Take the value from a Secret key (API keys, tokens): it is never stored in the FineTuneJob."""


class ServeResources(_Model):
    """Size of each vLLM pod."""

    gpus_per_node: int = Field(default=1, ge=0, le=64)
    """GPUs per vLLM pod; must be at least ``tensorParallelSize``."""
    cpu: str | None = Field(default=None, max_length=32)
    """CPU request and limit."""
    memory: str | None = Field(default=None, max_length=32)
    """Memory request and limit."""


class ServeSpec(_Model):
    """Serve the result with vLLM's OpenAI-compatible server (a Deployment and a Service)."""

    enabled: bool = False
    """Create the vLLM Deployment once training (and merging) succeeded."""
    image: str | None = Field(default=None, max_length=512, pattern=IMAGE_PATTERN)
    """vLLM image; the operator's default when omitted (the operator may allow only some images)."""
    replicas: int = Field(default=1, ge=0, le=64)
    """Number of vLLM pods (mutable: scales the Deployment)."""
    served_model_name: str | None = Field(default=None, max_length=128, pattern=SERVED_MODEL_NAME_PATTERN)
    """Model name clients use; the FineTuneJob's name when omitted."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """vLLM ``--tensor-parallel-size``."""
    max_model_len: int | None = Field(default=None, ge=1, le=10_000_000)
    """vLLM ``--max-model-len``."""
    max_lora_rank: int | None = Field(default=None, ge=1, le=1024)
    """vLLM ``--max-lora-rank`` when adapters are served without merging; the largest stage rank by default."""
    resources: ServeResources | None = None
    """GPUs, CPU and memory of each vLLM pod."""
    args: list[str] = Field(default_factory=list, max_length=64)
    """Extra vLLM command-line arguments."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables of the vLLM container (secrets through ``valueFrom.secretKeyRef``). The
    variables the operator sets (``HF_HUB_OFFLINE``, ``HF_HOME``, ...) and loader variables (``LD_PRELOAD``,
    ``PYTHONPATH``, ...) are refused."""
    api_key_secret_ref: SecretKeyRef | None = None
    """A Secret key holding the API key clients must send (vLLM's ``VLLM_API_KEY``); no key when omitted."""
    scheduling: StepScheduling | None = None
    """Scheduling of the vLLM pods, over ``spec.scheduling``."""


class SchedulingSpec(_Model):
    """Where and how the workloads are scheduled."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels every pod requires, except that GPU labels (keys with ``nvidia.com/``, ``amd.com/``, ``gpu``
    or ``accelerator``) apply only to pods that request GPUs: download and merge pods stay off GPU nodes."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations of every pod (those of GPU taints only for pods that request GPUs)."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of every pod."""
    affinity: Affinity | None = None
    """Affinity of every pod (a step's own ``scheduling.affinity`` replaces it)."""
    queue_name: str | None = Field(default=None, max_length=63)
    """Kueue LocalQueue: workloads get ``kueue.x-k8s.io/queue-name`` and are created suspended."""
    scheduler_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Scheduler (e.g. ``volcano``; with the pytorchjob backend also set as its schedulingPolicy)."""


class TrainingRuntimeRef(_Model):
    """The Kubeflow Trainer v2 runtime a TrainJob uses (``backend: trainjob``)."""

    name: str = Field(default="torch-distributed", min_length=1, max_length=253)
    """Runtime name; ``torch-distributed`` is the PyTorch runtime Trainer v2 installs."""
    kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    """``ClusterTrainingRuntime`` (cluster-wide) or ``TrainingRuntime`` (in the FineTuneJob's namespace)."""


class WandbSpec(_Model):
    """Weights & Biases: runs are named ``<job>-<stage>`` and grouped by job."""

    project: str = Field(min_length=1, max_length=128)
    """W&B project (``WANDB_PROJECT``)."""
    entity: str | None = Field(default=None, max_length=128)
    """W&B entity: user or team (``WANDB_ENTITY``)."""
    host: str | None = Field(default=None, max_length=512, pattern=r"^https?://[^\s]+$")
    """Server URL of a self-hosted W&B (``WANDB_BASE_URL``)."""
    api_key_secret_ref: SecretKeyRef
    """API key (``WANDB_API_KEY``), from a Secret into training pods only."""


class MlflowSpec(_Model):
    """MLflow: runs are named ``<job>-<stage>``."""

    tracking_uri: str = Field(min_length=1, max_length=512, pattern=r"^(https?|databricks)://[^\s]*$")
    """Tracking server (``MLFLOW_TRACKING_URI``)."""
    experiment: str | None = Field(default=None, max_length=256)
    """Experiment name (``MLFLOW_EXPERIMENT_NAME``); MLflow's default experiment when omitted."""
    token_secret_ref: SecretKeyRef | None = None
    """Bearer token (``MLFLOW_TRACKING_TOKEN``), from a Secret."""
    username_secret_ref: SecretKeyRef | None = None
    """Basic-auth user (``MLFLOW_TRACKING_USERNAME``), from a Secret."""
    password_secret_ref: SecretKeyRef | None = None
    """Basic-auth password (``MLFLOW_TRACKING_PASSWORD``), from a Secret."""


class TensorBoardSpec(_Model):
    """TensorBoard event files, written next to each stage's outputs (``<stage output>/runs/``)."""

    enabled: bool = True
    """Write TensorBoard logs."""


class TrackingSpec(_Model):
    """Experiment trackers every training stage reports to (LLaMA-Factory's ``report_to``). Credentials come
    from Secrets as ``secretKeyRef`` into training pods only: never into configs, status or other pods."""

    wandb: WandbSpec | None = None
    """Report to Weights & Biases."""
    mlflow: MlflowSpec | None = None
    """Report to MLflow."""
    tensorboard: TensorBoardSpec | None = None
    """Write TensorBoard logs with the outputs."""


class FineTuneJobSpec(_Model):
    """Desired state: a base model, datasets and stages; optionally merge and serve."""

    backend: Backend | None = None
    """Workload kind for training: ``job`` (batch/v1), ``pytorchjob`` (Kubeflow training-operator v1),
    ``deepspeedjob`` (T9k) or ``trainjob`` (Kubeflow Trainer v2). Default: job when every stage has one node,
    else pytorchjob."""
    training_runtime: TrainingRuntimeRef | None = None
    """Trainer v2 runtime of ``backend: trainjob`` (default: the ``torch-distributed``
    ClusterTrainingRuntime); only valid with that backend."""
    image: str | None = Field(default=None, max_length=512, pattern=IMAGE_PATTERN)
    """Worker image (LLaMA-Factory); the operator's default when omitted (the operator may allow only some
    images)."""
    model: ModelSpec
    """The base model."""
    datasets: list[DatasetSpec] = Field(min_length=1, max_length=64)
    """Datasets the stages train on."""
    output: OutputSpec
    """Where results are written."""
    stages: list[StageSpec] = Field(min_length=1, max_length=16)
    """Training stages, run in order; each starts from the result of the one before."""
    merge: MergeSpec = Field(default_factory=MergeSpec)
    """Merge adapters into a full model after training."""
    evaluate: EvaluateSpec | None = None
    """Evaluate the candidate model after training (and merging)."""
    gate: GateSpec | None = None
    """Promotion gate: serve and publish the new model only when its evaluation passes (needs ``evaluate``)."""
    publish: PublishSpec | None = None
    """Publish the model to a hub, S3 and/or an OCI registry after the gate."""
    serve: ServeSpec = Field(default_factory=ServeSpec)
    """Serve the result with vLLM."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Scheduling of every pod."""
    tracking: TrackingSpec | None = None
    """Experiment trackers of the training stages (W&B, MLflow, TensorBoard)."""
    suspend: bool = False
    """Suspend the running workload (mutable); false resumes it."""
    retries: int = Field(default=2, ge=0, le=100)
    """Retries per stage; a retried stage resumes from its last checkpoint."""
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)
    """The preflight step (memory estimate and data check before the first GPU workload)."""
    run_id: str | None = Field(default=None, max_length=20, pattern=DNS_LABEL_PATTERN)
    """Names the run (DNS label, at most 20 characters). Changing it runs the whole pipeline again, the one
    way to re-run a job: together with it the training fields (model, datasets, stages, merge, ...) may change.
    Each run writes ``<out>/<job>/<runId>/...`` and has its own workloads; the vLLM Deployment rolls to the
    new model and keeps the previous one serving until the new pods are ready. Use a value not used before: an
    earlier run's value finds that run's finished workloads and outputs, and reuses them."""

    def resolved_backend(self) -> Backend:
        """The backend in force: the explicit one, else ``job`` for single-node pipelines."""
        if self.backend is not None:
            return self.backend
        multi = any(s.resources is not None and s.resources.nodes > 1 for s in self.stages)
        return "pytorchjob" if multi else "job"


class ObjectMeta(_Model):
    """The parts of metadata the API reads. Server-set fields are accepted and ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, max_length=253)
    """Object name."""
    namespace: str | None = None
    """Namespace (``default`` when omitted)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations."""


# --------------------------------------------------------------------------------------------------
# Status (written by the operator and, for progress only, by worker pods)
# --------------------------------------------------------------------------------------------------


class Condition(_Model):
    """A standard Kubernetes condition."""

    type: str = Field(max_length=316)
    """Ready, Succeeded, Failed, Suspended or Progressing."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = Field(max_length=1024)
    """CamelCase reason (documented constants)."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation this condition was computed from."""


class StageProgress(_Model):
    """Training progress reported by the worker (rank 0), read from LLaMA-Factory's trainer log."""

    step: int | None = None
    """Current optimizer step."""
    total_steps: int | None = None
    """Total optimizer steps."""
    percent: float | None = None
    """step / totalSteps x 100."""
    loss: float | None = None
    """Latest training loss."""
    epoch: float | None = None
    """Current (fractional) epoch."""
    eta: str | None = None
    """Estimated time remaining (e.g. ``0:12:34``)."""
    learning_rate: float | None = None
    """Learning rate at the reported step."""
    update_time: str | None = None
    """When the worker reported (RFC 3339)."""


class LossPoint(_Model):
    """One point of a stage's loss history; a merged point stands for ``samples`` reports (their mean)."""

    step: int = Field(ge=0)
    """Optimizer step (the last step of the reports this point merges)."""
    loss: float | None = None
    """Training loss (mean over the merged reports)."""
    learning_rate: float | None = None
    """Learning rate (mean over the merged reports)."""
    epoch: float | None = None
    """Fractional epoch at ``step``."""
    samples: int = Field(default=1, ge=1)
    """How many worker reports this point merges."""


class StageStatus(_Model):
    """Observed state of one stage (download, each training stage, merge, serve)."""

    name: str
    """Stage name."""
    type: str
    """download, a training stage type, merge or serve."""
    state: str = "Pending"
    """Pending, Running, Suspended, Succeeded, Failed or Retrying."""
    workload_kind: str | None = None
    """Kind of the child workload."""
    workload_name: str | None = None
    """Name of the child workload."""
    attempts: int = 0
    """How many times the workload was created."""
    start_time: str | None = None
    """When the stage's first workload was created."""
    completion_time: str | None = None
    """When the stage finished."""
    message: str | None = None
    """Last message (the child's failure reason, ...)."""
    progress: StageProgress | None = None
    """Training progress."""
    history: list[LossPoint] | None = Field(default=None, max_length=200)
    """Loss history of a training stage: at most 200 points, older points merged so the curve keeps its shape."""
    metrics: dict[str, float] | None = None
    """Metrics of an evaluation step."""


class PublishedCopy(_Model):
    """One published copy of the model."""

    name: str
    """The destination's name."""
    type: str
    """huggingface, s3 or oci."""
    url: str
    """Where it is (hub URL, ``s3://bucket/prefix``, ``oci://registry/repo:tag``)."""
    digest: str | None = None
    """OCI manifest digest or hub commit."""


class GateStatus(_Model):
    """The promotion gate's last decision."""

    result: Literal["Passed", "Failed"]
    """Passed or Failed."""
    metric: str
    """The gated metric."""
    value: float | None = None
    """The new model's value."""
    serving_value: float | None = None
    """The serving model's value it was compared with."""
    message: str = ""
    """Why."""


class Outputs(_Model):
    """Where the results are."""

    adapters: list[str] = Field(default_factory=list)
    """Adapter paths (in the output volume), in stage order."""
    model: str | None = None
    """Path of the final full model (merged, or the last full-parameter stage)."""
    merged_model: str | None = None
    """Path of the merged model."""
    endpoint: str | None = None
    """In-cluster OpenAI-compatible endpoint (``http://<svc>.<ns>.svc:8000/v1``)."""
    served_model_name: str | None = None
    """Model name to use with the endpoint."""
    metrics: dict[str, float] | None = None
    """Evaluation metrics of the model these outputs describe (the serving model's, once it serves)."""
    predictions: str | None = None
    """Path of the evaluation's predictions file (``generated_predictions.jsonl``)."""
    lineage: str | None = None
    """Path of ``finetune-lineage.json`` next to the model."""
    published: list[PublishedCopy] = Field(default_factory=list)
    """Where copies of the model went."""


class PlannedStage(_Model):
    """What the preflight step found for one training stage."""

    name: str = Field(max_length=63)
    """Stage name."""
    gpu_memory_gi_b: float | None = Field(default=None, alias="gpuMemoryGiB", ge=0)
    """Estimated peak memory per GPU (GiB)."""
    gpu: str | None = Field(default=None, max_length=128)
    """The GPU the estimate was compared with."""
    gpu_capacity_gi_b: float | None = Field(default=None, alias="gpuCapacityGiB", ge=0)
    """That GPU's memory (GiB)."""
    verdict: str | None = Field(default=None, max_length=64)
    """``fits``, ``tight``, ``does not fit``, ``unknown GPU`` or ``no GPU (CPU stage)``."""
    suggestion: str | None = Field(default=None, max_length=1024)
    """The cheapest change that fits."""
    samples: int | None = Field(default=None, ge=0)
    """Valid training samples after LLaMA-Factory's conversion."""
    dropped: int | None = Field(default=None, ge=0)
    """Rows dropped (malformed, missing columns, wrong roles, empty, ...)."""
    truncated: int | None = Field(default=None, ge=0)
    """Samples longer than cutoff_len."""
    tokens: int | None = Field(default=None, ge=0)
    """Training tokens (all epochs)."""
    total_steps: int | None = Field(default=None, ge=0)
    """Planned optimizer steps."""
    estimated_seconds: int | None = Field(default=None, ge=0)
    """Estimated training time."""


class PlanStatus(_Model):
    """The preflight step's report (written by its pod; shown, never used to decide: the step's exit decides)."""

    stages: list[PlannedStage] = Field(default_factory=list, max_length=16)
    """Per training stage."""
    reason: str | None = Field(default=None, max_length=64)
    """``WillNotFit`` or ``InvalidData`` when the job is refused (or warned about)."""
    message: str | None = Field(default=None, max_length=2048)
    """The stage, the numbers and the fix."""


class FineTuneJobStatus(_Model):
    """Observed state, written by the operator (and ``reported`` by worker pods)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    observed_generation: int | None = None
    """metadata.generation last acted upon."""
    run: str | None = None
    """``spec.runId`` of the run the stages belong to (absent for a job without runId)."""
    state: str | None = None
    """Summary for ``kubectl get``: Pending, Running, Suspended, Serving, Succeeded or Failed."""
    current_stage: str | None = None
    """Name of the stage in progress."""
    progress: str | None = None
    """Progress of the current stage for ``kubectl get`` (``12/100 (12%)``)."""
    loss: str | None = None
    """Latest training loss for ``kubectl get``."""
    metric: str | None = None
    """The gated (or first) evaluation metric for ``kubectl get`` (``eval_loss=1.234``)."""
    gate: GateStatus | None = None
    """The promotion gate's decision for this run."""
    conditions: list[Condition] = Field(default_factory=list)
    """Standard conditions."""
    stages: list[StageStatus] = Field(default_factory=list)
    """Per-stage state."""
    outputs: Outputs | None = None
    """Result paths and endpoint."""
    reported: dict[str, StageProgress] = Field(default_factory=dict)
    """Raw progress reports of worker pods, by stage name (the only field workers may write)."""
    plan: PlanStatus | None = None
    """The preflight step's plan: memory estimate, verdict, data statistics, steps and duration per stage."""


class FineTuneJob(_Model):
    """A whole fine-tuning pipeline: download, training stages, merge and serving."""

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    """finetune.dev/v1alpha1"""
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    """FineTuneJob"""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """Desired state."""
    status: FineTuneJobStatus | None = None
    """Observed state."""

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"
