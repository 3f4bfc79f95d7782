"""Table-driven tests of the operator's pure pieces: child interpretation, status building, progress folding,
the immutable-field check, the work queue and the API client's error mapping and retries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from finetune_operator.api.constants import ANNOTATION_ATTEMPT, LABEL_MANAGED_BY, MANAGER, Reason, State
from finetune_operator.controller import children as ch
from finetune_operator.controller import spec as specs
from finetune_operator.controller import status as st
from finetune_operator.controller.kube import AlreadyExists, ApiError, Conflict, NotFound, RestKube, Unavailable
from finetune_operator.controller.queue import WorkQueue


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


# ------------------------------------------------------------------------------------------------ children

INTERPRET = [
    # (id, object, phase, reason, suspended)
    ("job-new", {"kind": "Job", "spec": {}}, ch.Phase.PENDING, "", False),
    ("job-active", {"kind": "Job", "spec": {}, "status": {"active": 1}}, ch.Phase.RUNNING, "", False),
    ("job-started", {"kind": "Job", "status": {"startTime": "t"}}, ch.Phase.RUNNING, "", False),
    ("job-complete", {"kind": "Job", "status": {"conditions": [cond("Complete")]}}, ch.Phase.SUCCEEDED, "", False),
    ("job-criteria", {"kind": "Job", "status": {"conditions": [cond("SuccessCriteriaMet")]}}, "Succeeded", "", False),
    (
        "job-failed",
        {"kind": "Job", "status": {"conditions": [cond("Failed", reason="BackoffLimitExceeded")]}},
        ch.Phase.FAILED,
        "BackoffLimitExceeded",
        False,
    ),
    ("job-failed-false", {"kind": "Job", "status": {"conditions": [cond("Failed", "False")]}}, "Pending", "", False),
    ("job-suspended", {"kind": "Job", "spec": {"suspend": True}}, ch.Phase.SUSPENDED, "", True),
    (
        "job-suspended-but-done",
        {"kind": "Job", "spec": {"suspend": True}, "status": {"conditions": [cond("Complete")]}},
        ch.Phase.SUCCEEDED,
        "",
        False,
    ),
    ("ptj-new", {"kind": "PyTorchJob", "spec": {}}, ch.Phase.PENDING, "", False),
    (
        "ptj-running",
        {"kind": "PyTorchJob", "status": {"conditions": [cond("Created"), cond("Running")]}},
        ch.Phase.RUNNING,
        "",
        False,
    ),
    (
        "ptj-restarting",
        {"kind": "PyTorchJob", "status": {"conditions": [cond("Running", "False"), cond("Restarting")]}},
        ch.Phase.RUNNING,
        "",
        False,
    ),
    (
        "ptj-succeeded",
        {"kind": "PyTorchJob", "status": {"conditions": [cond("Running", "False"), cond("Succeeded")]}},
        ch.Phase.SUCCEEDED,
        "",
        False,
    ),
    (
        "ptj-failed",
        {"kind": "PyTorchJob", "status": {"conditions": [cond("Failed", reason="PyTorchJobFailed")]}},
        ch.Phase.FAILED,
        "PyTorchJobFailed",
        False,
    ),
    ("ptj-suspend-flag", {"kind": "PyTorchJob", "spec": {"runPolicy": {"suspend": True}}}, "Suspended", "", True),
    (
        "ptj-suspended-cond",
        {"kind": "PyTorchJob", "status": {"conditions": [cond("Suspended", reason="PyTorchJobSuspended")]}},
        ch.Phase.SUSPENDED,
        "PyTorchJobSuspended",
        False,
    ),
    ("dsj-pending", {"kind": "DeepSpeedJob", "status": {"phase": "Pending"}}, ch.Phase.PENDING, "", False),
    ("dsj-running", {"kind": "DeepSpeedJob", "status": {"phase": "Running"}}, ch.Phase.RUNNING, "", False),
    ("dsj-resuming", {"kind": "DeepSpeedJob", "status": {"phase": "Resuming"}}, ch.Phase.RUNNING, "", False),
    ("dsj-paused", {"kind": "DeepSpeedJob", "status": {"phase": "Paused"}}, ch.Phase.SUSPENDED, "", False),
    ("dsj-succeeded", {"kind": "DeepSpeedJob", "status": {"phase": "Succeeded"}}, ch.Phase.SUCCEEDED, "", False),
    (
        "dsj-failed",
        {"kind": "DeepSpeedJob", "status": {"phase": "Failed"}},
        ch.Phase.FAILED,
        "DeepSpeedJobFailed",
        False,
    ),
    (
        "dsj-failed-cond-reason",
        {"kind": "DeepSpeedJob", "status": {"phase": "Failed", "conditions": [cond("Failed", reason="Evicted")]}},
        ch.Phase.FAILED,
        "Evicted",
        False,
    ),
    (
        "dsj-conditions-only",
        {"kind": "DeepSpeedJob", "status": {"conditions": [cond("Completed")]}},
        "Succeeded",
        "",
        False,
    ),
    ("dsj-unknown", {"kind": "DeepSpeedJob", "status": {"phase": "Unknown"}}, ch.Phase.PENDING, "", False),
    ("dep-new", {"kind": "Deployment", "spec": {"replicas": 1}}, ch.Phase.PENDING, "", False),
    (
        "dep-available",
        {"kind": "Deployment", "status": {"availableReplicas": 1, "conditions": [cond("Available")]}},
        ch.Phase.RUNNING,
        "MinimumReplicasAvailable",
        False,
    ),
    (
        "dep-available-cond-no-replicas",
        {"kind": "Deployment", "status": {"availableReplicas": 0, "conditions": [cond("Available")]}},
        ch.Phase.PENDING,
        "",
        False,
    ),
    (
        "dep-deadline",
        {"kind": "Deployment", "status": {"conditions": [cond("Progressing", "False", "ProgressDeadlineExceeded")]}},
        ch.Phase.PENDING,
        "ProgressDeadlineExceeded",
        False,
    ),
]


@pytest.mark.parametrize(
    ("obj", "phase", "reason", "suspended"), [c[1:] for c in INTERPRET], ids=[c[0] for c in INTERPRET]
)
def test_interpret(obj: dict[str, Any], phase: str, reason: str, suspended: bool) -> None:
    got = ch.interpret(obj)
    assert (got.phase, got.reason, got.suspended) == (phase, reason, suspended)


def test_interpret_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="StatefulSet"):
        ch.interpret({"kind": "StatefulSet"})


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("Job", ["spec", "suspend"]),
        ("PyTorchJob", ["spec", "runPolicy", "suspend"]),
        ("DeepSpeedJob", ["spec", "runMode", "pause"]),
    ],
)
@pytest.mark.parametrize("suspend", [True, False])
def test_suspend_patch_round_trips(kind: str, path: list[str], suspend: bool) -> None:
    obj = {"kind": kind, "metadata": {"name": "w"}, "spec": {}}
    patched = ch.apply_suspend(obj, suspend, by_user=True)
    assert ch.is_suspended(patched) is suspend
    node: Any = patched
    for key in path:
        node = node[key]
    assert node is suspend or node.get("enabled", node.get("enable")) is suspend
    assert patched["metadata"]["annotations"][ch.ANNOTATION_SUSPENDED_BY_USER] == "true"
    assert obj["spec"] == {}  # the rendered object is not modified
    removal = ch.suspend_patch(obj, False, by_user=False)
    assert removal["metadata"]["annotations"][ch.ANNOTATION_SUSPENDED_BY_USER] is None


def test_deployments_are_not_suspendable() -> None:
    assert not ch.supports_suspend({"kind": "Deployment"})
    with pytest.raises(ValueError):
        ch.suspend_patch({"kind": "Deployment"}, True)


OWNER = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
}


@pytest.mark.parametrize(
    ("labels", "refs", "ours"),
    [
        ({LABEL_MANAGED_BY: MANAGER}, [ch.owner_reference(OWNER)], True),
        ({}, [ch.owner_reference(OWNER)], False),  # not labelled as ours
        ({LABEL_MANAGED_BY: MANAGER}, [], False),  # no owner
        ({LABEL_MANAGED_BY: MANAGER}, [{**ch.owner_reference(OWNER), "uid": "u0"}], False),  # a predecessor's
        ({LABEL_MANAGED_BY: MANAGER}, [{**ch.owner_reference(OWNER), "controller": False}], False),
        ({LABEL_MANAGED_BY: "helm"}, [ch.owner_reference(OWNER)], False),
    ],
)
def test_only_our_children_are_adopted(labels: dict[str, str], refs: list[dict[str, Any]], ours: bool) -> None:
    assert ch.is_ours({"metadata": {"labels": labels, "ownerReferences": refs}}, "u1") is ours


def test_with_owner_sets_namespace_owner_and_attempt() -> None:
    rendered = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j-sft", "labels": {}}}
    out = ch.with_owner(rendered, OWNER, attempt=3)
    assert out["metadata"]["namespace"] == "ns"
    assert out["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "j",
            "uid": "u1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert ch.attempt_of(out) == 3 and out["metadata"]["annotations"][ANNOTATION_ATTEMPT] == "3"
    assert "ownerReferences" not in rendered["metadata"]


@pytest.mark.parametrize(("raw", "attempt"), [(None, 1), ("2", 2), ("0", 1), ("x", 1), ("-3", 1), ("12", 12)])
def test_attempt_of(raw: str | None, attempt: int) -> None:
    annotations = {} if raw is None else {ANNOTATION_ATTEMPT: raw}
    assert ch.attempt_of({"metadata": {"annotations": annotations}}) == attempt


# ------------------------------------------------------------------------------------------------ status

PROGRESS = [
    ({"step": 12, "totalSteps": 100}, "12/100 (12%)", None),
    ({"step": 12, "totalSteps": 100, "percent": 12.4, "loss": 0.123456}, "12/100 (12%)", "0.1235"),
    ({"step": 1, "totalSteps": 3}, "1/3 (33%)", None),
    ({"step": 5}, "5", None),
    ({"loss": 2}, None, "2.0000"),
    ({}, None, None),
    ({"step": 10, "totalSteps": 10, "loss": "nan?"}, "10/10 (100%)", None),
]


@pytest.mark.parametrize(("report", "progress", "loss"), PROGRESS)
def test_progress_columns(report: dict[str, Any], progress: str | None, loss: str | None) -> None:
    folded = st.fold_progress(report)
    assert st.format_progress(folded) == progress
    assert st.format_loss(folded) == loss


def test_fold_progress_keeps_known_keys_and_computes_percent() -> None:
    assert st.fold_progress({"step": 1, "totalSteps": 4, "junk": "x"}) == {"step": 1, "totalSteps": 4, "percent": 25.0}
    assert st.fold_progress("garbage") is None  # type: ignore[arg-type]
    assert st.fold_progress({"totalSteps": 0, "step": 0}) == {"totalSteps": 0, "step": 0}


def test_condition_transition_time_moves_only_on_status_change() -> None:
    conds: list[dict[str, Any]] = []
    st.set_condition(conds, "Ready", False, "Pending", "", now="t1", generation=1)
    st.set_condition(conds, "Ready", False, "ServePending", "waiting", now="t2", generation=2)
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["reason"] == "ServePending"
    assert conds[0]["observedGeneration"] == 2
    st.set_condition(conds, "Ready", True, "Serving", "", now="t3", generation=2)
    assert conds[0]["lastTransitionTime"] == "t3" and conds[0]["status"] == "True"


SUMMARIES = [
    # (summary, state, {condition: status})
    (st.Summary(), State.PENDING, {"Ready": "False", "Progressing": "False", "Failed": "False"}),
    (st.Summary(current="sft"), State.RUNNING, {"Progressing": "True", "Ready": "False"}),
    (st.Summary(current="sft", suspended=True), State.SUSPENDED, {"Suspended": "True", "Progressing": "False"}),
    (st.Summary(succeeded=True), State.SUCCEEDED, {"Succeeded": "True", "Ready": "True", "Progressing": "False"}),
    (
        st.Summary(succeeded=True, serve_enabled=True, current="serve"),
        State.RUNNING,
        {"Ready": "False", "Succeeded": "True"},
    ),
    (st.Summary(succeeded=True, serve_enabled=True, serving=True, current="serve"), State.SERVING, {"Ready": "True"}),
    (
        st.Summary(failed="boom", current="sft"),
        State.FAILED,
        {"Failed": "True", "Ready": "False", "Progressing": "False"},
    ),
    (st.Summary(invalid="bad", suspended=True), State.FAILED, {"Failed": "True", "Suspended": "False"}),
    # A re-run trains while the previous model serves: Ready stays, the training shows as progress.
    (
        st.Summary(serve_enabled=True, serving_previous=True, current="sft"),
        State.RUNNING,
        {"Ready": "True", "Progressing": "True", "Succeeded": "False"},
    ),
    (
        st.Summary(serve_enabled=True, serving_previous=True, failed="boom", current="sft"),
        State.FAILED,
        {"Ready": "False", "Failed": "True"},
    ),
    (
        st.Summary(succeeded=True, serve_enabled=True, serving=True, rolling=True, current="serve"),
        State.SERVING,
        {"Ready": "True", "Progressing": "False"},
    ),
]


@pytest.mark.parametrize(("summary", "state", "expected"), SUMMARIES)
def test_summary_state_and_conditions(summary: st.Summary, state: str, expected: dict[str, str]) -> None:
    assert st.summary_state(summary) == state
    conds = st.build_conditions([], summary, now="t", generation=3)
    assert [c["type"] for c in conds] == ["Ready", "Succeeded", "Failed", "Suspended", "Progressing"]
    by_type = {c["type"]: c for c in conds}
    for type_, status in expected.items():
        assert by_type[type_]["status"] == status, type_
    assert all(c["observedGeneration"] == 3 and c["reason"] for c in conds)
    if summary.invalid:
        assert by_type["Failed"]["reason"] == Reason.INVALID_SPEC and by_type["Failed"]["message"] == "bad"


def stage(name: str, state: str, attempts: int = 1, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "attempts": attempts,
        "workloadKind": "Job",
        "workloadName": f"j-{name}",
        **kw,
    }


EVENTS = [
    ([], [stage("sft", "Running")], [("Normal", Reason.STAGE_STARTED)]),
    ([stage("sft", "Running")], [stage("sft", "Running")], []),
    (
        [stage("sft", "Running")],
        [stage("sft", "Succeeded"), stage("dpo", "Running")],
        [("Normal", Reason.STAGE_SUCCEEDED), ("Normal", Reason.STAGE_STARTED)],
    ),
    ([stage("sft", "Running")], [stage("sft", "Retrying", message="x")], [("Warning", Reason.STAGE_FAILED)]),
    ([stage("sft", "Retrying")], [stage("sft", "Running", 2)], [("Normal", Reason.STAGE_RETRYING)]),
    ([stage("sft", "Running", 2)], [stage("sft", "Failed", 2)], [("Warning", Reason.RETRIES_EXHAUSTED)]),
    ([stage("sft", "Running")], [stage("sft", "Suspended")], []),
]


@pytest.mark.parametrize(("old", "new", "expected"), EVENTS)
def test_transition_events(
    old: list[dict[str, Any]], new: list[dict[str, Any]], expected: list[tuple[str, str]]
) -> None:
    got = st.transition_events({"stages": old}, {"stages": new})
    assert [(e.type, e.reason) for e in got] == expected


def test_ready_event_names_the_endpoint() -> None:
    new = {
        "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}],
        "outputs": {"endpoint": "http://x"},
    }
    (event,) = st.transition_events({}, new)
    assert event.reason == "Serving" and "http://x" in event.message
    assert st.transition_events(new, new) == []


@pytest.mark.parametrize(
    ("change", "only_progress"),
    [
        ({"progress": "2/10 (20%)"}, True),
        ({"loss": "0.1"}, True),
        ({"stages": [{"name": "sft", "state": "Running", "progress": {"step": 3}}]}, True),
        ({"stages": [{"name": "sft", "state": "Succeeded", "progress": {"step": 3}}]}, False),
        ({"state": "Succeeded"}, False),
    ],
)
def test_only_progress_changed(change: dict[str, Any], only_progress: bool) -> None:
    old = {
        "state": "Running",
        "progress": "1/10 (10%)",
        "stages": [{"name": "sft", "state": "Running", "progress": {"step": 1}}],
    }
    assert st.only_progress_changed(old, {**old, **change}) is only_progress


# ------------------------------------------------------------------------------------------------ spec

BASE = {
    "model": {"template": "qwen"},
    "stages": [{"name": "sft"}],
    "suspend": False,
    "retries": 2,
    "serve": {"enabled": True, "replicas": 1, "image": "vllm:1"},
}

IMMUTABLE = [
    ({"suspend": True}, []),
    ({"retries": 5}, []),
    ({"serve": {**BASE["serve"], "replicas": 3}}, []),
    ({"model": {"template": "llama3"}}, ["spec.model"]),
    ({"stages": []}, ["spec.stages"]),
    ({"serve": {**BASE["serve"], "image": "vllm:2"}}, ["spec.serve"]),
    ({"backend": "pytorchjob"}, ["spec.backend"]),
    ({"image": "x", "model": {}}, ["spec.image", "spec.model"]),
]


@pytest.mark.parametrize(("change", "fields"), IMMUTABLE)
def test_changed_immutable_fields(change: dict[str, Any], fields: list[str]) -> None:
    assert specs.changed_immutable_fields(BASE, {**BASE, **change}) == fields


def test_removing_a_mutable_field_is_not_an_immutable_change() -> None:
    current = {k: v for k, v in BASE.items() if k != "retries"}
    current["serve"] = {"enabled": True, "image": "vllm:1"}
    assert specs.changed_immutable_fields(BASE, current) == []
    assert specs.immutable_part({"serve": {"replicas": 2}}) == {}


def test_effective_spec_takes_only_mutable_fields_from_the_current_spec() -> None:
    current = {**BASE, "suspend": True, "model": {"template": "llama3"}, "serve": {**BASE["serve"], "replicas": 4}}
    eff = specs.effective_spec(BASE, current)
    assert eff["suspend"] is True and eff["serve"]["replicas"] == 4
    assert eff["model"] == {"template": "qwen"} and eff["serve"]["image"] == "vllm:1"
    assert "retries" not in specs.effective_spec(BASE, {k: v for k, v in current.items() if k != "retries"})


@pytest.mark.parametrize(
    ("text", "expected"), [(None, None), ("", None), ("{bad", None), ("[1]", None), ('{"a":1}', {"a": 1})]
)
def test_load_accepted_spec(text: str | None, expected: Any) -> None:
    assert specs.load(text) == expected
    if expected is not None:
        assert specs.load(specs.dump(expected)) == expected


# ------------------------------------------------------------------------------------------------ queue


async def test_queue_dedupes_and_never_runs_a_key_twice_at_once() -> None:
    running: set[str] = set()
    calls: list[str] = []
    gate = asyncio.Event()
    first_started = asyncio.Event()

    async def handler(key: str) -> float | None:
        assert key not in running, "concurrent reconcile of one key"
        running.add(key)
        calls.append(key)
        if len(calls) == 1:
            first_started.set()
            await gate.wait()
        running.discard(key)
        return None

    q: WorkQueue[str] = WorkQueue(handler, workers=4)
    q.start()
    try:
        q.add("a")
        await asyncio.wait_for(first_started.wait(), 5)  # "a" is being processed now
        for _ in range(5):
            q.add("a")  # arrives while "a" is being processed: one more run afterwards, not five
        q.add("b")
        q.add("b")
        gate.set()
        await asyncio.wait_for(q.wait_idle(), 5)
    finally:
        await q.stop()
    assert sorted(calls) == ["a", "a", "b"]


async def test_queue_requeues_after_errors_with_backoff_and_after_requested_delays() -> None:
    seen: list[str] = []
    errors: list[BaseException] = []
    third = asyncio.Event()

    async def handler(key: str) -> float | None:
        seen.append(key)
        if len(seen) == 1:
            raise RuntimeError("transient")
        if len(seen) == 3:
            third.set()
        return 0.01 if len(seen) == 2 else None

    q: WorkQueue[str] = WorkQueue(handler, workers=1, backoff=0.01, on_error=lambda k, e: errors.append(e))
    q.start()
    try:
        q.add("x")
        await asyncio.wait_for(third.wait(), 5)  # after the error's backoff and the requested delay
        await asyncio.wait_for(q.wait_idle(), 5)
    finally:
        await q.stop()
    assert seen == ["x", "x", "x"] and [str(e) for e in errors] == ["transient"]


# ------------------------------------------------------------------------------------------------ kube client


def fake(responses: list[tuple[int, dict[str, Any] | bytes]]) -> tuple[Any, list[tuple[str, str, Any]]]:
    sent: list[tuple[str, str, Any]] = []

    async def request(method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> Any:
        sent.append((method, url, json.loads(body) if body else None))
        status, payload = responses.pop(0)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return status, {"Retry-After": "0"} if status == 429 else {}, data

    return request, sent


@pytest.mark.parametrize(
    ("status", "body", "verb", "error"),
    [
        (404, {"reason": "NotFound"}, "get", None),
        (409, {"reason": "AlreadyExists", "message": "exists"}, "create", AlreadyExists),
        (409, {"reason": "Conflict", "message": "stale"}, "patch", Conflict),
        (422, {"reason": "Invalid", "message": "spec.x: bad"}, "patch", ApiError),
        (403, b"forbidden", "create", ApiError),
    ],
)
async def test_error_mapping(status: int, body: Any, verb: str, error: type[ApiError] | None) -> None:
    request, _ = fake([(status, body)])
    kube = RestKube(request, backoff=0)
    obj = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "ns"}}
    call = {
        "get": lambda: kube.get("batch/v1", "Job", "ns", "j"),
        "create": lambda: kube.create(obj),
        "patch": lambda: kube.patch("batch/v1", "Job", "ns", "j", {"spec": {}}),
    }[verb]
    if error is None:
        assert await call() is None
        return
    with pytest.raises(error) as info:
        await call()
    assert not isinstance(info.value, NotFound) and info.value.status == status


async def test_retries_429_and_5xx_then_succeeds() -> None:
    retries: list[tuple[str, int]] = []
    request, sent = fake([(429, {}), (500, {}), (503, b"x"), (201, {"metadata": {"name": "c"}})])
    kube = RestKube(request, backoff=0.001, on_retry=lambda v, s: retries.append((v, s)))
    created = await kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}})
    assert created["metadata"]["name"] == "c"
    assert retries == [("POST", 429), ("POST", 500), ("POST", 503)]
    assert [s[1] for s in sent] == ["/api/v1/namespaces/n/configmaps"] * 4


async def test_gives_up_after_max_attempts() -> None:
    request, sent = fake([(500, {})] * 3)
    kube = RestKube(request, backoff=0.001, max_attempts=3)
    with pytest.raises(Unavailable):
        await kube.get("apps/v1", "Deployment", "n", "d")
    assert len(sent) == 3


async def test_paths_and_bodies() -> None:
    request, sent = fake([(200, {}), (200, {}), (200, {})])
    kube = RestKube(request)
    await kube.patch("finetune.dev/v1alpha1", "FineTuneJob", "ml", "j", {"status": {}}, subresource="status")
    await kube.delete("kubeflow.org/v1", "PyTorchJob", "ml", "p")
    await kube.get("batch.tensorstack.dev/v1beta1", "DeepSpeedJob", "ml", "d")
    assert sent[0][:2] == ("PATCH", "/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/j/status")
    assert sent[1] == (
        "DELETE",
        "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs/p",
        {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
    )
    assert sent[2][1] == "/apis/batch.tensorstack.dev/v1beta1/namespaces/ml/deepspeedjobs/d"


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        (
            {"outputs": {"endpoint": "e", "model": "m"}},
            {"outputs": {"model": "m"}},
            {"outputs": {"model": "m", "endpoint": None}},
        ),
        ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1, "d": None}}}),
        ({"stages": [{"x": 1}]}, {"stages": []}, {"stages": []}),  # lists are replaced whole
        ({}, {"state": "Running"}, {"state": "Running"}),
    ],
)
def test_status_patches_delete_vanished_nested_keys(
    old: dict[str, Any], new: dict[str, Any], patch: dict[str, Any]
) -> None:
    from finetune_operator.controller.reconciler import _with_deletions

    assert _with_deletions(old, new) == patch


@pytest.mark.parametrize(
    ("accepted", "current", "new_run"),
    [
        ({}, {}, False),
        ({}, {"runId": "a"}, True),
        ({"runId": "a"}, {"runId": "a"}, False),
        ({"runId": "a"}, {"runId": "b"}, True),
        ({"runId": "a"}, {}, False),  # removing it is a refused edit, not a run
    ],
)
def test_is_new_run(accepted: dict[str, Any], current: dict[str, Any], new_run: bool) -> None:
    assert specs.is_new_run(accepted, current) is new_run
    if not new_run and accepted != current:
        assert specs.changed_immutable_fields(accepted, current) == ["spec.runId"]


def _deployment(generation: int, want: int, **status: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": want}, "status": status}


@pytest.mark.parametrize(
    ("dep", "done"),
    [
        (_deployment(2, 2, observedGeneration=2, replicas=2, updatedReplicas=2, availableReplicas=2), True),
        (_deployment(2, 2, observedGeneration=1, replicas=2, updatedReplicas=2, availableReplicas=2), False),
        (_deployment(2, 2, observedGeneration=2, replicas=3, updatedReplicas=2, availableReplicas=3), False),  # surge
        (_deployment(2, 2, observedGeneration=2, replicas=2, updatedReplicas=1, availableReplicas=2), False),
        (_deployment(2, 2, observedGeneration=2, replicas=2, updatedReplicas=2, availableReplicas=1), False),
        (_deployment(3, 0, observedGeneration=3), True),
    ],
    ids=["done", "not-observed", "old-pod-left", "half-updated", "new-not-available", "scaled-to-0"],
)
def test_rollout_complete(dep: dict[str, Any], done: bool) -> None:
    assert ch.rollout_complete(dep) is done


async def test_the_service_proxy_post_is_sent_once_and_answers_as_is() -> None:
    """The answer check's POST: a proxied 503 is a result to report (no retry), a hang is Unavailable."""
    request, sent = fake([(503, {"reason": "ServiceUnavailable"})])
    kube = RestKube(request, backoff=0.001)
    status, body = await kube.post_raw(
        "/api/v1/namespaces/n/services/s:8000/proxy/v1/chat/completions", {"a": 1}, timeout=5
    )
    assert status == 503 and json.loads(body)["reason"] == "ServiceUnavailable"
    assert [s[:3] for s in sent] == [
        ("POST", "/api/v1/namespaces/n/services/s:8000/proxy/v1/chat/completions", {"a": 1})
    ]

    async def hang(method: str, url: str, headers: Any, data: Any) -> Any:
        await asyncio.sleep(10)

    with pytest.raises(Unavailable, match=r"no answer within 0\.05s"):
        await RestKube(hang).post_raw("/x", {}, timeout=0.05)
