"""Validate a FineTuneJob and report *every* problem at once, each with its field path and reason.

Two passes, both always run:

1. **Shape** -- the pydantic models in :mod:`finetune_operator.api.types` in strict mode (so ``retries: "2"``
   fails here exactly as it fails in the API server's schema). Pydantic's locations are turned into wire
   paths (``spec.stages[1].datasets[0]``, camelCase) and its messages into sentences with "did you mean" hints.
2. **Semantics** -- small named rules (:data:`RULES`) over the *raw* object. They read the raw dict rather than
   the parsed model on purpose: a typo in one field must not hide an undeclared dataset in another, so each
   rule skips silently what is malformed (pass 1 already reported it) and checks what it can.

LLaMA-Factory's arguments are checked against the generated table in :mod:`finetune_operator.lfargs` (names,
types, choices, templates) -- no torch and no llamafactory import at runtime.

Decisions documented here because users will hit them:

- ``kto`` stages take plain (non-ranking) datasets with a ``columns.ktoTag`` boolean column (LLaMA-Factory
  loads kto data with ``stage="kto"`` and refuses ranking data); ``rm``/``dpo`` need ``ranking: true``.
- ``nodes > 1`` with backend ``job`` is valid: it becomes an Indexed Job with a headless Service.
- ``merge.enabled`` without any LoRA stage is valid: the export re-shards the full model (``exportSize``).
- Serving without merge after LoRA stages serves the base model plus the adapter (vLLM ``--enable-lora``);
  vLLM cannot stack adapters, so this is rejected when the final model is more than one stacked adapter.
- A ``full``/``freeze`` stage cannot follow a LoRA stage (LLaMA-Factory loads adapters only for LoRA
  training). A ``qlora`` or ZeRO-3 LoRA stage continues the single earlier adapter (LLaMA-Factory: "Cannot
  create new adapter upon a quantized model"), so it is rejected after two or more stacked adapters.
- ``qlora`` with DeepSpeed ZeRO-3 is valid: LLaMA-Factory supports 4-bit bitsandbytes models under ZeRO-3
  (it refuses only 8-bit, HQQ and EETQ there).
- ``lora_rank``/``lora_alpha``/``lora_dropout``/``lora_target`` are always the operator's for lora/qlora
  stages (from ``lora``, or its defaults): set them in the ``lora`` block.
- Derived child names are hash-truncated (:mod:`finetune_operator.api.naming`), so only the job name itself
  is limited: it must be a DNS-1123 label of at most 63 characters because it is also a label value.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pydantic
import yaml

from finetune_operator.api import graph, naming
from finetune_operator.api.types import ADAPTER_METHODS, PREFERENCE_STAGES, FineTuneJob, FineTuneJobStatus
from finetune_operator.errors import FieldError, SpecError
from finetune_operator.lfargs import LfTable
from finetune_operator.lfargs import load as load_lf_table

__all__ = [
    "RESERVED_ARGS",
    "RESERVED_PREFIXES",
    "RULES",
    "SECRET_ARGS",
    "check",
    "is_quantity",
    "load_documents",
    "validate",
]


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def validate(obj: Mapping[str, Any]) -> FineTuneJob:
    """Parse and check ``obj`` (a FineTuneJob as a dict); raise :class:`SpecError` listing every problem."""
    job, errors = check(obj)
    if errors or job is None:
        raise SpecError(errors or [FieldError("", "invalid FineTuneJob")])
    return job


def check(obj: Any) -> tuple[FineTuneJob | None, list[FieldError]]:
    """Like :func:`validate` but returns ``(job or None, errors)`` instead of raising (for the operator)."""
    if not isinstance(obj, Mapping):
        return None, [FieldError("<document>", f"expected a mapping (a FineTuneJob object), got {_kind(obj)}")]
    obj = _plain(obj)
    # Status is the operator's and the workers' output, not user input: a status the types do not describe
    # (an older operator, a pruned field) must never make the *spec* invalid. It is parsed leniently below.
    status = obj.pop("status", None)
    errors: list[FieldError] = []
    job: FineTuneJob | None = None
    try:
        job = FineTuneJob.model_validate(obj, strict=True)
    except pydantic.ValidationError as exc:
        errors.extend(_shape_errors(exc, obj))
    ctx = _Context(obj, load_lf_table())
    for rule in RULES:
        errors.extend(rule(ctx))
    errors = _dedupe(errors)
    if errors or job is None:
        return None, errors
    if isinstance(status, Mapping):
        try:
            job.status = FineTuneJobStatus.model_validate(status)
        except pydantic.ValidationError:
            job.status = None
    return job, errors


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts and lists: kopf hands over mapping *views*, which strict pydantic refuses."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Read every YAML document of ``path`` (``-`` for stdin), skipping empty ones.

    Raises :class:`SpecError` with the line and column on a YAML syntax error or a document that is not a
    mapping; :class:`OSError` when the file cannot be read (the CLI maps that to a usage error).
    """
    import sys

    name = str(path)
    text = sys.stdin.read() if name == "-" else Path(path).read_text(encoding="utf-8")
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        raise SpecError([FieldError("<yaml>", f"YAML error at {where}: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([FieldError("<yaml>", f"YAML error: {exc}")]) from None
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise SpecError([FieldError(f"<document {i + 1}>", f"expected a mapping, got {_kind(doc)}")])
        out.append(doc)
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads like ``kubectl apply`` does.

    * ``1e-4`` is a float, as in Kubernetes (YAML 1.2 / JSON numbers) and OmegaConf. PyYAML follows YAML 1.1,
      where a float needs a dot (``1.0e-4``); ``learning_rate: 1e-4`` would otherwise be the *string* "1e-4"
      here but a number for the API server, and the two paths would disagree.
    * A duplicate key is an error (kubectl refuses it too); PyYAML would silently keep the last value, so a
      second ``args:`` block would quietly replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# ----------------------------------------------------------------------------------------------------------
# Pass 1: pydantic errors -> wire paths
# ----------------------------------------------------------------------------------------------------------


def _shape_errors(exc: pydantic.ValidationError, obj: Mapping[str, Any]) -> list[FieldError]:
    grouped: dict[str, list[str]] = {}
    expected: dict[str, tuple[list[str], Any]] = {}
    for err in exc.errors(include_url=False):
        path, model = _wire_path(err["loc"], obj, err["type"])
        grouped.setdefault(path, [])
        word = _EXPECTED_TYPE.get(err["type"])
        if word is not None:
            # Union members each report a failure ("not a string", "not a list"): one sentence per path.
            words, _ = expected.setdefault(path, ([], err.get("input")))
            if word not in words:
                words.append(word)
            continue
        message = _shape_message(err, model)
        if message not in grouped[path]:
            grouped[path].append(message)
    for path, (words, value) in expected.items():
        grouped[path].append(f"wrong type: expected {' or '.join(words)}, got {_kind(value)}")
    return [FieldError(path, "; ".join(msgs)) for path, msgs in grouped.items() if msgs]


_EXPECTED_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _wire_path(loc: tuple[int | str, ...], obj: Any, err_type: str) -> tuple[str, Any]:
    """Follow ``loc`` through the input: keys/indexes that exist form the path, union tags are dropped.

    Returns the path and the pydantic model class whose field the last element names (for hints).
    """
    path = ""
    cur: Any = obj
    annotation: Any = FineTuneJob
    owner: Any = None
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(cur, list) and 0 <= part < len(cur):
            path += f"[{part}]"
            cur = cur[part]
            annotation = _item_annotation(annotation)
        elif isinstance(part, str) and isinstance(cur, Mapping) and (part in cur or (last and err_type == "missing")):
            owner = _model_of(annotation)
            path = _join(path, part)
            cur = cur.get(part)
            annotation = _field_annotation(owner, part) if owner is not None else _item_annotation(annotation)
        # anything else is a union tag ('str', 'list[str]', ...) that names no wire field
    return path or "<document>", owner


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _join(path: str, key: str) -> str:
    """``path.key``, or ``path["key"]`` for map keys that are not identifiers (``nvidia.com/gpu.product``)."""
    if _IDENTIFIER.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _model_of(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for member in get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else ():
        model = _model_of(member)
        if model is not None:
            return model
    return None


def _field_annotation(model: type[pydantic.BaseModel], alias: str) -> Any:
    for name, info in model.model_fields.items():
        if alias in (info.alias, name):
            return info.annotation
    return None


def _item_annotation(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (Union, type(int | None)):
        for member in get_args(annotation):
            inner = _item_annotation(member)
            if inner is not None:
                return inner
        return None
    if origin is list:
        return get_args(annotation)[0]
    if origin is dict:
        return get_args(annotation)[1]
    return None


def _field_aliases(model: type[pydantic.BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _shape_message(err: Mapping[str, Any], model: type[pydantic.BaseModel] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    loc = err["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        return f"unknown field {key!r}{_hint(key, _field_aliases(model))}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        value = err.get("input")
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected)
        hint = _hint(str(value), choices) if isinstance(value, str) else ""
        return f"unsupported value {value!r}: expected {expected}{hint}"
    if kind == "string_pattern_mismatch":
        return f"invalid value {err.get('input')!r}: {_pattern_reason(str(ctx.get('pattern', '')))}"
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


def _pattern_reason(pattern: str) -> str:
    from finetune_operator.api import types as t

    if pattern == t.DNS_LABEL_PATTERN:
        return "must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)"
    if pattern == t.DNS_SUBDOMAIN_PATTERN:
        return "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
    if pattern == t.DATASET_NAME_PATTERN:
        return "must be letters, digits, '-', '_' or '.' (starting and ending alphanumeric; no commas or '/')"
    return f"must match {pattern}"


# ----------------------------------------------------------------------------------------------------------
# Pass 2: semantic rules over the raw object
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """The raw object with tolerant accessors: each returns only what has the expected shape."""

    obj: Mapping[str, Any]
    lf: LfTable

    @property
    def spec(self) -> Mapping[str, Any]:
        spec = self.obj.get("spec")
        return spec if isinstance(spec, Mapping) else {}

    def section(self, key: str) -> Mapping[str, Any]:
        value = self.spec.get(key)
        return value if isinstance(value, Mapping) else {}

    def stages(self) -> list[tuple[int, Mapping[str, Any]]]:
        return _mappings(self.spec.get("stages"))

    def datasets(self) -> list[tuple[int, Mapping[str, Any]]]:
        return _mappings(self.spec.get("datasets"))

    def datasets_by_name(self) -> dict[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for _, ds in self.datasets():
            name = ds.get("name")
            if isinstance(name, str):
                out.setdefault(name, ds)
        return out

    @staticmethod
    def method(stage: Mapping[str, Any]) -> str:
        method = stage.get("method", "lora")
        return method if isinstance(method, str) else "lora"

    @staticmethod
    def args(stage: Mapping[str, Any]) -> Mapping[str, Any]:
        args = stage.get("args")
        return args if isinstance(args, Mapping) else {}

    @staticmethod
    def zero_stage(stage: Mapping[str, Any]) -> int | None:
        ds = stage.get("deepspeed")
        if not isinstance(ds, Mapping):
            return None
        zs = ds.get("zeroStage", 2)
        return zs if isinstance(zs, int) else None


def _mappings(value: Any) -> list[tuple[int, Mapping[str, Any]]]:
    if not isinstance(value, list):
        return []
    return [(i, v) for i, v in enumerate(value) if isinstance(v, Mapping)]


Rule = Callable[[_Context], Iterable[FieldError]]
RULES: list[Rule] = []


def _rule(func: Rule) -> Rule:
    """Register a semantic rule (run in definition order)."""
    RULES.append(func)
    return func


# --- names --------------------------------------------------------------------------------------------------


@_rule
def job_name_is_dns_label(ctx: _Context) -> Iterator[FieldError]:
    """The job name is a label value (finetune.dev/job, app.kubernetes.io/instance) and a name prefix."""
    meta = ctx.obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        return
    if len(name) > naming.MAX_NAME:
        yield FieldError(
            "metadata.name", f"must be at most {naming.MAX_NAME} characters (it is a label value), got {len(name)}"
        )
    elif not naming.is_dns_label(name):
        yield FieldError(
            "metadata.name",
            "must be a DNS-1123 label (lowercase letters, digits and '-', starting "
            "and ending alphanumeric): it names Services and pods",
        )


@_rule
def namespace_is_dns_label(ctx: _Context) -> Iterator[FieldError]:
    meta = ctx.obj.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    if isinstance(ns, str) and not naming.is_dns_label(ns):
        yield FieldError("metadata.namespace", "must be a DNS-1123 label")


#: Step names the pipeline uses besides training stages (and the merged model's output folder).
RESERVED_STAGE_NAMES = frozenset({"download", "merge", "merged", "serve"})


@_rule
def stage_names_unique_and_free(ctx: _Context) -> Iterator[FieldError]:
    seen: dict[str, int] = {}
    for i, stage in ctx.stages():
        name = stage.get("name")
        if not isinstance(name, str):
            continue
        if name in RESERVED_STAGE_NAMES:
            yield FieldError(
                f"spec.stages[{i}].name",
                f"{name!r} is reserved for the pipeline's own steps ({', '.join(sorted(RESERVED_STAGE_NAMES))})",
            )
        if name in seen:
            yield FieldError(
                f"spec.stages[{i}].name", f"duplicate stage name {name!r} (also spec.stages[{seen[name]}])"
            )
        else:
            seen[name] = i


@_rule
def run_id_is_not_a_folder_name(ctx: _Context) -> Iterator[FieldError]:
    """A run writes ``<out>/<job>/<runId>/``: a runId named like a stage or ``merged`` would put the new run
    inside the folder of a run-less run's stage (the layout before the first runId)."""
    run = ctx.spec.get("runId")
    if not isinstance(run, str):
        return
    stages = {s.get("name") for _, s in ctx.stages()}
    if run in RESERVED_STAGE_NAMES or run in stages:
        yield FieldError("spec.runId", f"{run!r} is a stage or step name; choose another runId (e.g. a date)")


@_rule
def dataset_names_unique(ctx: _Context) -> Iterator[FieldError]:
    seen: dict[str, int] = {}
    for i, ds in ctx.datasets():
        name = ds.get("name")
        if not isinstance(name, str):
            continue
        if name in seen:
            yield FieldError(
                f"spec.datasets[{i}].name", f"duplicate dataset name {name!r} (also spec.datasets[{seen[name]}])"
            )
        else:
            seen[name] = i


@_rule
def offload_needs_zero(ctx: _Context) -> Iterator[FieldError]:
    """DeepSpeed offloads ZeRO-partitioned state: with ZeRO stage 0 there is nothing to offload."""
    for i, stage in ctx.stages():
        ds = stage.get("deepspeed")
        if isinstance(ds, Mapping) and ds.get("offload") is True and ctx.zero_stage(stage) == 0:
            yield FieldError(
                f"spec.stages[{i}].deepspeed.offload", "needs zeroStage 1, 2 or 3 (ZeRO stage 0 partitions nothing)"
            )


# --- datasets and stages ------------------------------------------------------------------------------------


@_rule
def stage_datasets_declared(ctx: _Context) -> Iterator[FieldError]:
    declared = ctx.datasets_by_name()
    for i, stage in ctx.stages():
        refs = stage.get("datasets")
        if not isinstance(refs, list):
            continue
        seen: set[str] = set()
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                continue
            path = f"spec.stages[{i}].datasets[{j}]"
            if ref not in declared:
                yield FieldError(path, f"undeclared dataset {ref!r}: not in spec.datasets{_hint(ref, declared)}")
            elif ref in seen:
                yield FieldError(path, f"dataset {ref!r} is listed twice")
            seen.add(ref)


@_rule
def stage_data_matches_type(ctx: _Context) -> Iterator[FieldError]:
    """rm/dpo train on preference pairs; pt/sft/kto refuse them (LLaMA-Factory's loader raises late)."""
    declared = ctx.datasets_by_name()
    for i, stage in ctx.stages():
        stype, refs = stage.get("type"), stage.get("datasets")
        if not isinstance(stype, str) or not isinstance(refs, list):
            continue
        for j, ref in enumerate(refs):
            ds = declared.get(ref) if isinstance(ref, str) else None
            if ds is None:
                continue
            ranking = ds.get("ranking") is True
            path = f"spec.stages[{i}].datasets[{j}]"
            if stype in PREFERENCE_STAGES and not ranking:
                yield FieldError(
                    path,
                    f"stage type {stype} needs ranking data (preference pairs); dataset {ref!r} "
                    "is not ranking: set ranking: true with chosen/rejected columns",
                )
            elif stype not in PREFERENCE_STAGES and ranking:
                yield FieldError(
                    path,
                    f"stage type {stype} cannot train on ranking data (dataset {ref!r} has "
                    "ranking: true); use it in a dpo or rm stage",
                )
            if stype == "kto" and not ranking and not _columns(ds).get("ktoTag"):
                yield FieldError(
                    path, f"stage type kto needs a boolean label column: set columns.ktoTag on dataset {ref!r}"
                )


def _columns(ds: Mapping[str, Any]) -> Mapping[str, Any]:
    cols = ds.get("columns")
    return cols if isinstance(cols, Mapping) else {}


_ALPACA_ONLY_COLUMNS = ("prompt", "query", "response", "history")
_SHAREGPT_ONLY_COLUMNS = ("messages",)


@_rule
def dataset_columns_match_formatting(ctx: _Context) -> Iterator[FieldError]:
    for i, ds in ctx.datasets():
        fmt = ds.get("formatting", "alpaca")
        cols = _columns(ds)
        if fmt == "sharegpt":
            for col in _ALPACA_ONLY_COLUMNS:
                if col in cols:
                    yield FieldError(
                        f"spec.datasets[{i}].columns.{col}",
                        f"column {col!r} is for alpaca data; sharegpt data uses 'messages'",
                    )
        elif fmt == "alpaca":
            for col in _SHAREGPT_ONLY_COLUMNS:
                if col in cols:
                    yield FieldError(
                        f"spec.datasets[{i}].columns.{col}",
                        "column 'messages' is for sharegpt data: set formatting: sharegpt",
                    )
            if isinstance(ds.get("tags"), Mapping):
                yield FieldError(
                    f"spec.datasets[{i}].tags",
                    "tags apply to sharegpt data only: set formatting: sharegpt or remove tags",
                )


@_rule
def ranking_dataset_has_pair_columns(ctx: _Context) -> Iterator[FieldError]:
    for i, ds in ctx.datasets():
        cols = _columns(ds)
        if ds.get("ranking") is True:
            for col in ("chosen", "rejected"):
                if not cols.get(col):
                    yield FieldError(
                        f"spec.datasets[{i}].columns.{col}",
                        f"ranking data needs the {col!r} column name (LLaMA-Factory has no default)",
                    )
            if cols.get("ktoTag"):
                yield FieldError(
                    f"spec.datasets[{i}].columns.ktoTag",
                    "ktoTag marks kto data, which is not ranking: drop ranking or ktoTag",
                )


# --- volumes ------------------------------------------------------------------------------------------------


def _volume_refs(ctx: _Context) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("model", "output"):
        vol = ctx.section(key).get("volume")
        if isinstance(vol, Mapping):
            yield f"spec.{key}.volume", vol
    for i, ds in ctx.datasets():
        vol = ds.get("volume")
        if isinstance(vol, Mapping):
            yield f"spec.datasets[{i}].volume", vol


@_rule
def sub_paths_stay_inside_volume(ctx: _Context) -> Iterator[FieldError]:
    """A subPath is joined under the mount point: an absolute or '..' path would escape it."""
    for path, vol in _volume_refs(ctx):
        sub = vol.get("subPath")
        if not isinstance(sub, str):
            continue
        parts = sub.split("/")
        if sub.startswith("/") or ".." in parts:
            yield FieldError(
                f"{path}.subPath", "must be a relative path inside the volume (no leading '/' and no '..')"
            )
        elif "\x00" in sub or "\n" in sub:
            yield FieldError(f"{path}.subPath", "must not contain NUL or newline characters")


# --- model --------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@_rule
def model_template_known(ctx: _Context) -> Iterator[FieldError]:
    template = ctx.section("model").get("template")
    if isinstance(template, str) and template and template not in ctx.lf.templates:
        yield FieldError(
            "spec.model.template", f"unknown LLaMA-Factory template {template!r}{_hint(template, ctx.lf.templates)}"
        )


@_rule
def model_source_is_hub_id(ctx: _Context) -> Iterator[FieldError]:
    source = ctx.section("model").get("source")
    if isinstance(source, str) and not _HUB_ID.match(source):
        yield FieldError(
            "spec.model.source",
            f"{source!r} is not a hub model id (like 'Qwen/Qwen2-7B-Instruct'); "
            "omit source when the model is already on the volume",
        )


_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@_rule
def token_secret_ref_valid(ctx: _Context) -> Iterator[FieldError]:
    ref = ctx.section("model").get("tokenSecretRef")
    if not isinstance(ref, Mapping):
        return
    name, key = ref.get("name"), ref.get("key")
    if isinstance(name, str) and name and not _DNS_SUBDOMAIN.match(name):
        yield FieldError("spec.model.tokenSecretRef.name", "must be a Secret name (DNS-1123 subdomain)")
    if isinstance(key, str) and key and not _SECRET_KEY.match(key):
        yield FieldError("spec.model.tokenSecretRef.key", "must be a Secret key (letters, digits, '-', '_', '.')")


# --- methods and stage order --------------------------------------------------------------------------------


@_rule
def lora_block_needs_adapter_method(ctx: _Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        method = ctx.method(stage)
        if stage.get("lora") is not None and method not in ADAPTER_METHODS:
            yield FieldError(
                f"spec.stages[{i}].lora",
                f"lora settings apply to methods lora and qlora only, not {method!r}: remove lora or change method",
            )


_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.*-]+$")


@_rule
def lora_target_names_modules(ctx: _Context) -> Iterator[FieldError]:
    """``all``, ``q_proj,v_proj`` or a list of module names (the CRD checks the string form with a pattern)."""
    for i, stage in ctx.stages():
        lora = stage.get("lora")
        target = lora.get("target") if isinstance(lora, Mapping) else None
        path = f"spec.stages[{i}].lora.target"
        if isinstance(target, str) and not all(_MODULE_NAME.match(t) for t in target.split(",")):
            yield FieldError(
                path, f"{target!r} is not 'all' or a comma-separated list of module names (no spaces or empty names)"
            )
        elif isinstance(target, list):
            if not target:
                yield FieldError(path, "must name at least one module (or use 'all')")
            for j, name in enumerate(target):
                if isinstance(name, str) and not _MODULE_NAME.match(name):
                    yield FieldError(f"{path}[{j}]", f"{name!r} is not a module name")


def _continues_adapter(ctx: _Context, stage: Mapping[str, Any]) -> bool:
    """LLaMA-Factory cannot create a new adapter on a 4-bit (qlora) or ZeRO-3 partitioned model: such a stage
    continues training the single earlier adapter instead (the renderer's chaining rule)."""
    return ctx.method(stage) == "qlora" or ctx.zero_stage(stage) == 3


def _graph(ctx: _Context) -> graph.Graph:
    """The stage graph of the raw object (:mod:`finetune_operator.api.graph`), walked like the renderer does."""
    nodes = []
    for i, stage in ctx.stages():
        method = ctx.method(stage)
        lora = stage.get("lora")
        rank = lora.get("rank", 8) if isinstance(lora, Mapping) else 8
        name, stype, start = stage.get("name"), stage.get("type"), stage.get("startFrom")
        nodes.append(
            graph.Node(
                index=i,
                name=name if isinstance(name, str) else f"#{i}",
                type=stype if isinstance(stype, str) else "",
                method=method,
                continues=_continues_adapter(ctx, stage),
                rank=rank if isinstance(rank, int) else 8,
                start_from=start if isinstance(start, str) else None,
            )
        )
    return graph.walk(nodes)


def _adapter_chain(ctx: _Context) -> tuple[list[FieldError], list[tuple[int, int]]]:
    """Errors for impossible starts, and the final adapters (index, rank) that merge/serve use."""
    g = _graph(ctx)
    errors = [FieldError(f"spec.stages[{e.index}].{e.field}", e.message) for e in g.errors]
    merge_stage = ctx.section("merge").get("stage")
    final = g.final(merge_stage if isinstance(merge_stage, str) else None)
    return errors, list(zip(final.adapters, final.ranks, strict=True))


@_rule
def stage_chain_is_loadable(ctx: _Context) -> Iterator[FieldError]:
    """What LLaMA-Factory can start each stage from: references to earlier stages only (no cycles), and
    starts LLaMA-Factory can load."""
    yield from _adapter_chain(ctx)[0]


@_rule
def stage_model_refs(ctx: _Context) -> Iterator[FieldError]:
    """rewardModel (ppo only, required there, an earlier rm stage or a volume) and reference (ppo/dpo/kto)."""
    g = _graph(ctx)
    position = {node.index: pos for pos, node in enumerate(g.nodes)}
    for i, stage in ctx.stages():
        stype = stage.get("type")
        for key, allowed in (("rewardModel", ("ppo",)), ("reference", ("ppo", "dpo", "kto"))):
            ref = stage.get(key)
            path = f"spec.stages[{i}].{key}"
            if ref is None:
                if key == "rewardModel" and stype == "ppo":
                    yield FieldError(
                        path, "a ppo stage needs a reward model: an earlier rm stage ({stage: rm}) or a volume"
                    )
                continue
            if not isinstance(ref, Mapping):
                continue
            if isinstance(stype, str) and stype not in allowed:
                yield FieldError(path, f"applies to {' and '.join(allowed)} stages only, not {stype}")
                continue
            has_stage, has_volume = ref.get("stage") is not None, ref.get("volume") is not None
            if has_stage == has_volume:
                yield FieldError(path, "set exactly one of stage and volume")
                continue
            if not has_stage or not isinstance(ref.get("stage"), str) or i not in position:
                continue
            idx, problem = graph.resolve_earlier(g.nodes, position[i], ref["stage"], f"{key}.stage")
            if problem is not None or idx is None:
                yield FieldError(f"{path}.stage", problem or "unknown stage")
            elif key == "rewardModel" and g.nodes[position[idx]].type != "rm":
                yield FieldError(
                    f"{path}.stage", f"stage {ref['stage']!r} is not an rm stage: a reward model comes from an rm stage"
                )
            if key == "reference" and stype == "dpo":
                loss = ctx.args(stage).get("pref_loss")
                if loss in ("orpo", "simpo"):
                    yield FieldError(path, f"pref_loss {loss} is reference-free: remove the reference")


@_rule
def ppo_args_supported(ctx: _Context) -> Iterator[FieldError]:
    """What LLaMA-Factory's PPO trainer refuses: evaluation, best-model reloading (rm refuses the latter too)."""
    for i, stage in ctx.stages():
        if stage.get("type") not in ("ppo", "rm"):
            continue
        args = ctx.args(stage)
        for key, why in (
            ("val_size", "PPO does not support an evaluation dataset"),
            ("eval_dataset", "PPO does not support an evaluation dataset"),
            ("do_eval", "PPO training does not support evaluation: evaluate in an sft stage"),
            ("load_best_model_at_end", "rm and ppo stages do not support load_best_model_at_end"),
        ):
            if stage.get("type") == "rm" and key != "load_best_model_at_end":
                continue
            if key in args and args[key] not in (None, False, 0, 0.0):
                yield FieldError(f"spec.stages[{i}].args.{key}", why)


@_rule
def merge_stage_known(ctx: _Context) -> Iterator[FieldError]:
    """merge.stage names a stage of the job."""
    name = ctx.section("merge").get("stage")
    if not isinstance(name, str):
        return
    names = [s.get("name") for _, s in ctx.stages()]
    if name not in names:
        hint = _hint(name, [str(n) for n in names])
        yield FieldError("spec.merge.stage", f"{name!r} is not a stage of this job{hint}")


# --- resources ----------------------------------------------------------------------------------------------

#: A Kubernetes resource.Quantity (apimachinery's regex, without sign: requests are never negative).
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[KMGTPE]i|[numkMGTPE])?$")


def is_quantity(value: str) -> bool:
    """Whether ``value`` is a non-negative Kubernetes quantity (``500m``, ``2``, ``64Gi``, ``1e3``)."""
    return bool(_QUANTITY.match(value))


def _resources(ctx: _Context) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for i, stage in ctx.stages():
        res = stage.get("resources")
        if isinstance(res, Mapping):
            yield f"spec.stages[{i}].resources", res
    for key in ("merge", "serve"):
        res = ctx.section(key).get("resources")
        if isinstance(res, Mapping):
            yield f"spec.{key}.resources", res


@_rule
def resource_quantities_valid(ctx: _Context) -> Iterator[FieldError]:
    for path, res in _resources(ctx):
        for key in ("cpu", "memory"):
            value = res.get(key)
            if isinstance(value, str) and not is_quantity(value):
                yield FieldError(f"{path}.{key}", f"{value!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")


# --- serve --------------------------------------------------------------------------------------------------

#: vLLM flags the renderer sets from spec fields.
_SERVE_OWNED_FLAGS: Mapping[str, str] = {
    "--model": "the pipeline's result",
    "--served-model-name": "spec.serve.servedModelName",
    "--tensor-parallel-size": "spec.serve.tensorParallelSize",
    "-tp": "spec.serve.tensorParallelSize",
    "--max-model-len": "spec.serve.maxModelLen",
    "--max-lora-rank": "spec.serve.maxLoraRank",
    "--enable-lora": "the pipeline (set when adapters are served without merge)",
    "--lora-modules": "the pipeline (set when adapters are served without merge)",
    "--port": "the operator (port 8000)",
    "--host": "the operator",
}


@_rule
def serve_tensor_parallel_fits(ctx: _Context) -> Iterator[FieldError]:
    serve = ctx.section("serve")
    tp = serve.get("tensorParallelSize", 1)
    res = serve.get("resources")
    gpus = res.get("gpusPerNode", 1) if isinstance(res, Mapping) else 1
    if isinstance(tp, int) and isinstance(gpus, int) and gpus > 0 and tp > gpus:
        yield FieldError(
            "spec.serve.tensorParallelSize",
            f"tensorParallelSize {tp} is larger than the GPUs of each vLLM pod "
            f"(spec.serve.resources.gpusPerNode = {gpus})",
        )


@_rule
def serve_args_not_owned(ctx: _Context) -> Iterator[FieldError]:
    args = ctx.section("serve").get("args")
    if not isinstance(args, list):
        return
    for j, arg in enumerate(args):
        if not isinstance(arg, str):
            continue
        flag = arg.split("=", 1)[0]
        if flag in _SERVE_OWNED_FLAGS:
            yield FieldError(f"spec.serve.args[{j}]", f"{flag} is set by the operator: use {_SERVE_OWNED_FLAGS[flag]}")


@_rule
def serve_unmerged_adapters(ctx: _Context) -> Iterator[FieldError]:
    """Without merge, vLLM serves the base model plus *one* adapter: it cannot stack adapters."""
    serve, merge = ctx.section("serve"), ctx.section("merge")
    if serve.get("enabled") is not True or merge.get("enabled") is True:
        return
    _, adapters = _adapter_chain(ctx)
    if len(adapters) > 1:
        names = ", ".join(f"spec.stages[{i}]" for i, _ in adapters)
        yield FieldError(
            "spec.merge.enabled",
            f"serving without merge supports a single LoRA adapter, but {names} "
            "stack adapters: set merge.enabled: true",
        )
    max_rank = serve.get("maxLoraRank")
    for i, rank in adapters:
        if isinstance(max_rank, int) and rank > max_rank:
            yield FieldError(
                "spec.serve.maxLoraRank",
                f"maxLoraRank {max_rank} is smaller than the LoRA rank {rank} of spec.stages[{i}]",
            )


# --- scheduling ---------------------------------------------------------------------------------------------

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_VALUE.match(name))


@_rule
def scheduling_fields_valid(ctx: _Context) -> Iterator[FieldError]:
    sched = ctx.section("scheduling")
    queue = sched.get("queueName")
    if isinstance(queue, str) and not (_LABEL_VALUE.match(queue) and len(queue) <= 63):
        yield FieldError(
            "spec.scheduling.queueName", "must be a valid label value (it becomes the kueue.x-k8s.io/queue-name label)"
        )
    prio = sched.get("priorityClassName")
    if isinstance(prio, str) and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", prio):
        yield FieldError("spec.scheduling.priorityClassName", "must be a DNS-1123 subdomain")
    selector = sched.get("nodeSelector")
    if isinstance(selector, Mapping):
        for key, value in selector.items():
            where = _join("spec.scheduling.nodeSelector", str(key))
            if not _is_label_key(str(key)):
                yield FieldError(
                    where, "invalid label key (optional DNS prefix and '/', then a name of at most 63 characters)"
                )
            if isinstance(value, str) and not (_LABEL_VALUE.match(value) and len(value) <= 63):
                yield FieldError(where, "must be a valid label value")
    for j, tol in _mappings(sched.get("tolerations")):
        path = f"spec.scheduling.tolerations[{j}]"
        if tol.get("operator") == "Exists" and tol.get("value"):
            yield FieldError(f"{path}.value", "must be empty when operator is Exists")
        if not tol.get("key") and tol.get("operator", "Equal") != "Exists":
            yield FieldError(f"{path}.operator", "must be Exists when key is empty")
        if tol.get("tolerationSeconds") is not None and tol.get("effect") != "NoExecute":
            yield FieldError(f"{path}.tolerationSeconds", "only applies to effect NoExecute")


# --- LLaMA-Factory arguments --------------------------------------------------------------------------------

#: Arguments the operator sets itself, with where the user says what they want instead.
RESERVED_ARGS: Mapping[str, str] = {
    "model_name_or_path": "spec.model",
    "adapter_name_or_path": "the stage order (earlier LoRA stages are stacked automatically)",
    "create_new_adapter": "the stage order (set automatically when adapters stack)",
    "output_dir": "spec.output (stages write to <output>/<job>/<stage>/)",
    "overwrite_output_dir": "nothing: the operator resumes from the last checkpoint on retry",
    "resume_from_checkpoint": "nothing: the operator resumes from the last checkpoint on retry",
    "dataset": "spec.stages[].datasets",
    "eval_dataset": "spec.stages[].datasets and args.val_size",
    "dataset_dir": "spec.datasets",
    "deepspeed": "spec.stages[].deepspeed",
    "template": "spec.model.template",
    "stage": "spec.stages[].type",
    "finetuning_type": "spec.stages[].method",
    "quantization_bit": "method: qlora (4-bit)",
    "do_train": "nothing: training stages always train",
    "export_dir": "spec.merge",
    "export_size": "spec.merge.exportSize",
    "export_device": "spec.merge.exportDevice",
    "export_legacy_format": "spec.merge",
    "export_hub_model_id": "spec.merge",
    "cache_dir": "nothing: caches live in the pod",
    "model_revision": "spec.model.revision",
}

#: Families of arguments that belong to other steps than training (LLaMA-Factory ignores them in ``train``).
RESERVED_PREFIXES: Mapping[str, str] = {
    "export_": "spec.merge (the merge step runs the export)",
    "vllm_": "spec.serve (vLLM runs in the serve step)",
    "sglang_": "spec.serve (the serve step uses vLLM)",
    "infer_": "spec.serve (inference runs in the serve step)",
}

#: LoRA arguments the renderer sets for lora/qlora stages from the ``lora`` block (or its defaults).
LORA_BLOCK_ARGS: Mapping[str, str] = {
    "lora_rank": "spec.stages[].lora.rank",
    "lora_alpha": "spec.stages[].lora.alpha",
    "lora_dropout": "spec.stages[].lora.dropout",
    "lora_target": "spec.stages[].lora.target",
}

#: Credentials: args end up in a ConfigMap, and secrets must only travel as secretKeyRef.
SECRET_ARGS = frozenset(
    {
        "hf_hub_token",
        "ms_hub_token",
        "om_hub_token",
        "hub_token",
        "swanlab_api_key",
        "swanlab_lark_secret",
        "swanlab_lark_webhook_url",
    }
)

#: Arguments that only mean something for LoRA training (LLaMA-Factory ignores or rejects them otherwise).
LORA_ONLY_ARGS = frozenset(
    {
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "use_rslora",
        "use_dora",
        "pissa_init",
        "pissa_iter",
        "pissa_convert",
    }
)
FREEZE_ONLY_ARGS = frozenset({"freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"})
#: SFT-only arguments (LLaMA-Factory: "cannot be set as True except SFT").
SFT_ONLY_ARGS = frozenset({"predict_with_generate", "neat_packing", "train_on_prompt", "mask_history"})


@_rule
def args_keys_allowed(ctx: _Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        method = ctx.method(stage)
        for key in ctx.args(stage):
            path = _join(f"spec.stages[{i}].args", str(key))
            if key in SECRET_ARGS:
                yield FieldError(
                    path,
                    "credentials must not be in args (they would be stored in a ConfigMap): "
                    "use spec.model.tokenSecretRef",
                )
            elif key in RESERVED_ARGS:
                yield FieldError(path, f"{key} is set by the operator: use {RESERVED_ARGS[key]}")
            elif str(key).startswith(tuple(RESERVED_PREFIXES)):
                use = next(v for p, v in RESERVED_PREFIXES.items() if str(key).startswith(p))
                yield FieldError(path, f"{key} does not apply to a training stage: use {use}")
            elif key in LORA_BLOCK_ARGS and method in ADAPTER_METHODS:
                yield FieldError(
                    path, f"{key} is set by the operator from the stage's lora settings: use {LORA_BLOCK_ARGS[key]}"
                )
            elif key in LORA_ONLY_ARGS and method not in ADAPTER_METHODS:
                yield FieldError(path, f"{key} applies to methods lora and qlora only, not {method!r}")
            elif key in FREEZE_ONLY_ARGS and method != "freeze":
                yield FieldError(path, f"{key} applies to method freeze only, not {method!r}")
            elif key not in ctx.lf.arguments:
                yield FieldError(path, f"unknown LLaMA-Factory argument {key!r}{_hint(key, ctx.lf.arguments)}")


@_rule
def args_values_typed(ctx: _Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        for key, value in ctx.args(stage).items():
            spec = ctx.lf.arguments.get(key)
            if spec is None or key in RESERVED_ARGS or key in SECRET_ARGS:
                continue
            path = _join(f"spec.stages[{i}].args", str(key))
            if not spec.accepts_type(value):
                expected = " or ".join(_TYPE_WORDS.get(t, t) for t in spec.types)
                got = _kind(value) if value is None else f"{_kind(value)} {value!r}"
                yield FieldError(path, f"wrong type: expected {expected}, got {got}{_number_hint(value, spec.types)}")
            elif spec.choices is not None and value is not None and value not in spec.choices:
                choices = ", ".join(repr(c) for c in spec.choices)
                hint = _hint(value, [str(c) for c in spec.choices]) if isinstance(value, str) else ""
                yield FieldError(path, f"invalid choice {value!r}: expected one of {choices}{hint}")


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "null": "null",
}


def _number_hint(value: Any, types: tuple[str, ...]) -> str:
    if isinstance(value, str) and ("float" in types or "int" in types):
        try:
            float(value)
        except ValueError:
            return ""
        return " (write the number without quotes)"
    return ""


def _truthy(args: Mapping[str, Any], key: str) -> bool:
    return args.get(key) is True


@dataclass(frozen=True)
class _ArgsRule:
    """A cross-argument rule of LLaMA-Factory's parser, checked before a pod starts."""

    key: str
    applies: Callable[[Mapping[str, Any], Mapping[str, Any], _Context], bool]
    message: str


#: (argument to blame, condition on (stage, args), reason). Mirrors checks in LLaMA-Factory's hparams parser.
ARGS_RULES: tuple[_ArgsRule, ...] = (
    _ArgsRule(
        "fp16",
        lambda s, a, c: _truthy(a, "bf16") and _truthy(a, "fp16"),
        "bf16 and fp16 cannot both be true: choose one mixed-precision type",
    ),
    _ArgsRule(
        "pure_bf16",
        lambda s, a, c: _truthy(a, "pure_bf16") and c.zero_stage(s) == 3,
        "pure_bf16 is incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "predict_with_generate",
        lambda s, a, c: _truthy(a, "predict_with_generate") and c.zero_stage(s) == 3,
        "predict_with_generate is incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "pissa_init",
        lambda s, a, c: _truthy(a, "pissa_init") and (c.zero_stage(s) == 3 or c.method(s) == "qlora"),
        "pissa_init cannot initialize adapters under DeepSpeed ZeRO-3 or on a quantized (qlora) model",
    ),
    _ArgsRule(
        "use_unsloth",
        lambda s, a, c: _truthy(a, "use_unsloth") and c.zero_stage(s) == 3,
        "use_unsloth is incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "fp8",
        lambda s, a, c: _truthy(a, "fp8") and c.method(s) == "qlora",
        "fp8 training is incompatible with quantization (method qlora)",
    ),
    _ArgsRule(
        "use_galore",
        lambda s, a, c: _truthy(a, "use_galore") and s.get("deepspeed") is not None,
        "GaLore is incompatible with DeepSpeed: remove spec.stages[].deepspeed",
    ),
    _ArgsRule(
        "use_apollo",
        lambda s, a, c: _truthy(a, "use_apollo") and s.get("deepspeed") is not None,
        "APOLLO is incompatible with DeepSpeed: remove spec.stages[].deepspeed",
    ),
    *(
        _ArgsRule(
            k,
            (lambda key: lambda s, a, c: _truthy(a, key) and c.method(s) in ADAPTER_METHODS)(k),
            f"{k} cannot be combined with LoRA: use method full or freeze",
        )
        for k in ("use_galore", "use_apollo", "use_badam")
    ),
    *(
        _ArgsRule(
            k,
            (lambda key: lambda s, a, c: _truthy(a, key) and s.get("type") != "sft")(k),
            f"{k} is only valid for sft stages",
        )
        for k in sorted(SFT_ONLY_ARGS)
    ),
    _ArgsRule(
        "load_best_model_at_end",
        lambda s, a, c: _truthy(a, "load_best_model_at_end") and s.get("type") == "rm",
        "rm stages do not support load_best_model_at_end",
    ),
    _ArgsRule(
        "do_eval",
        lambda s, a, c: (
            (_truthy(a, "do_eval") or _truthy(a, "do_predict"))
            and not (isinstance(a.get("val_size"), int | float) and a["val_size"] > 0)
        ),
        "evaluation needs a validation split: set args.val_size (e.g. 0.1)",
    ),
    _ArgsRule(
        "streaming",
        lambda s, a, c: _truthy(a, "streaming") and not isinstance(a.get("max_steps"), int),
        "streaming needs args.max_steps (the dataset length is unknown)",
    ),
    _ArgsRule(
        "push_to_hub",
        lambda s, a, c: _truthy(a, "push_to_hub"),
        "training pods get no hub credentials (the token reaches only the download pod): keep results on "
        "spec.output and publish the merged model from there",
    ),
    _ArgsRule(
        "use_llama_pro",
        lambda s, a, c: _truthy(a, "use_llama_pro") and c.method(s) == "full",
        "use_llama_pro is only valid for freeze or LoRA training",
    ),
    _ArgsRule(
        "quantization_device_map",
        lambda s, a, c: a.get("quantization_device_map") is not None,
        "a device map cannot be used for quantized models in training",
    ),
    _ArgsRule(
        "quantization_method",
        lambda s, a, c: a.get("quantization_method") in ("hqq", "eetq") and c.zero_stage(s) == 3,
        "HQQ and EETQ quantization are incompatible with DeepSpeed ZeRO-3",
    ),
    _ArgsRule(
        "dpo_label_smoothing",
        lambda s, a, c: (
            s.get("type") == "dpo"
            and a.get("pref_loss", "sigmoid") != "sigmoid"
            and isinstance(a.get("dpo_label_smoothing"), int | float)
            and a["dpo_label_smoothing"] > 1e-6
        ),
        "dpo_label_smoothing is only valid with pref_loss sigmoid",
    ),
)


@_rule
def args_combinations(ctx: _Context) -> Iterator[FieldError]:
    for i, stage in ctx.stages():
        args = ctx.args(stage)
        if not args:
            continue
        for rule in ARGS_RULES:
            try:
                hit = rule.applies(stage, args, ctx)
            except TypeError:  # a mistyped value; args_values_typed reports it
                hit = False
            if hit:
                yield FieldError(f"spec.stages[{i}].args.{rule.key}", rule.message)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _hint(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` when ``word`` is close to a candidate, else ``""``."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[tuple[str, str]] = set()
    out: list[FieldError] = []
    for err in errors:
        key = (err.path, err.message)
        if key not in seen:
            seen.add(key)
            out.append(err)
    return out
