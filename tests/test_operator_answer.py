"""The answer check: one real chat completion through the vLLM Service before ``Ready`` turns true.

The operator (real kopf, in a thread, RBAC of the installed chart enforced) POSTs a chat completion through the
emulated API server's Service proxy; behind the Service answers the stand-in of the vLLM pods
(tests/emulator/chat_backend.py: vLLM's OpenAI answer and error shapes), or, in the ``vllm`` test, the real tiny
vLLM. The tests make the Deployment available and decide what its Service answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator.api import constants as c
from finetune_operator.api.naming import short_hash
from finetune_operator.controller import answering

from . import test_operator_harness as harness
from .emulator import EmulatorServer
from .emulator.chat_backend import behaviour_of, serve_deployment
from .emulator.players import RESOURCE, make_available
from .served_model import ServedModel
from .test_operator_eval_publish import finish_with_result, job_pod
from .test_operator_harness import (
    FTJ,
    OperatorThread,
    condition,
    events,
    fail_child,
    fast_config,
    ftj_status,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

cluster = harness.cluster

SERVE = {"enabled": True, "replicas": 1, "resources": {"gpusPerNode": 1}}


@pytest.fixture()
def operator(cluster: EmulatorServer) -> Iterator[OperatorThread]:
    """The operator with a short answer-check backoff (0.2 s doubling to 0.8 s; 2 s to 60 s by default), so that
    the tests see several failed checks in a second; the backoff itself is what runs."""
    op = OperatorThread(fast_config(answer_retry_initial=0.2, answer_retry_max=0.8)).start()
    try:
        yield op
    finally:
        op.stop()


def trained(server: EmulatorServer, name: str, **spec: Any) -> dict[str, Any]:
    """Create a one-stage serving job, finish its training; the Deployment the operator then creates."""
    server.create(minimal(name, **{"serve": SERVE, **spec}))
    wait_child(server, "Job", f"{name}-sft")
    succeed(server, "Job", f"{name}-sft")
    return server.wait_for_object("deployments.apps", f"{name}-serve")


def wait_ready(server: EmulatorServer, name: str, status: str, reason: str, timeout: float = 30) -> dict[str, Any]:
    return server.wait_for(
        lambda: (
            (s := ftj_status(server, name))
            and condition(s, "Ready").get("status") == status
            and condition(s, "Ready").get("reason") == reason
            and s
        ),
        timeout,
        f"{name}: Ready={status} ({reason}) not reached: {condition(ftj_status(server, name), 'Ready')}",
    )


def answered(server: EmulatorServer, deployment: str) -> str | None:
    dep = server.get("deployments.apps", deployment) or {}
    return (dep.get("metadata", {}).get("annotations") or {}).get(c.ANNOTATION_ANSWERED)


def test_ready_waits_for_a_chat_completion_through_the_service(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    dep = trained(cluster, "ans")
    # Available, but nothing answers behind the Service yet (the API server: no endpoints).
    make_available(cluster, "ans-serve", answer=False)
    status = wait_ready(cluster, "ans", "False", c.Reason.SERVICE_NOT_ANSWERING)
    ready = condition(status, "Ready")["message"]
    assert 'HTTP 503 ServiceUnavailable: no endpoints available for service "ans-serve"' in ready, ready
    assert status["state"] == "Running" and "endpoint" not in (status.get("outputs") or {})
    assert condition(status, "Progressing")["status"] == "True"
    assert next(s for s in status["stages"] if s["name"] == "serve")["message"] == ready
    # Sent through the Service proxy, as the chart's ServiceAccount (RBAC enforced): create on services/proxy.
    proxied = [r for r in cluster.emulator.request_log if r.subresource == "proxy"]
    assert proxied and {(r.verb, r.resource, r.name) for r in proxied} == {("create", "services", "ans-serve")}

    # The pods answer: the next check passes, Ready turns true.
    serve_deployment(cluster, "ans-serve")
    status = wait_state(cluster, "ans", "Serving")
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Ready")["message"] == (
        "the vLLM Deployment is available and its Service answered a chat completion"
    )
    assert status["outputs"]["endpoint"] == "http://ans-serve.default.svc:8000/v1"
    backend = behaviour_of(cluster, "ans-serve")
    (sent,) = backend.requests
    assert sent["model"] == "ans" and sent["max_tokens"] <= 16 and sent["stream"] is False
    assert [m["role"] for m in sent["messages"]] == ["user"]
    assert wait_event(cluster, "ans", c.Reason.SERVICE_ANSWERED) == [
        ("Normal", c.Reason.SERVICE_ANSWERED, "Service ans-serve answered a chat completion of model 'ans'")
    ]
    spec_hash = dep["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]
    assert answered(cluster, "ans-serve") == f"{dep['metadata']['uid']}:{spec_hash}"

    # Recorded on the Deployment: later looks and a scale-up send no new completion.
    operator.wait_reconciled("ans", times=2)
    cluster.patch(FTJ, "ans", {"spec": {"serve": {"replicas": 2}}})
    cluster.wait_for_object("deployments.apps", "ans-serve", condition=lambda d: d["spec"]["replicas"] == 2)
    make_available(cluster, "ans-serve", answer=False)
    operator.wait_reconciled("ans", times=1)
    assert condition(ftj_status(cluster, "ans"), "Ready")["status"] == "True"
    assert len(backend.requests) == 1

    # Suspending scales to zero and forgets the answer: resuming is a rollout that is checked again.
    cluster.patch(FTJ, "ans", {"spec": {"suspend": True}})
    wait_state(cluster, "ans", "Suspended")
    assert answered(cluster, "ans-serve") is None
    cluster.patch(FTJ, "ans", {"spec": {"suspend": False}})
    cluster.wait_for_object("deployments.apps", "ans-serve", condition=lambda d: d["spec"]["replicas"] == 2)
    make_available(cluster, "ans-serve", answer=False)
    cluster.wait_for(lambda: answered(cluster, "ans-serve") is not None, 20, "resuming was not checked")
    wait_state(cluster, "ans", "Serving")
    assert len(backend.requests) == 2


@pytest.mark.parametrize(
    ("misbehave", "detail"),
    [
        ({"status": 503}, "HTTP 503 ServiceUnavailableError: the server is not ready"),
        ({"models": ("someone-else",)}, "HTTP 404 NotFoundError: The model `bad` does not exist."),
        ({"claim_model": "someone-else"}, "HTTP 200 but the answer is from model 'someone-else', not 'bad'"),
    ],
    ids=["503", "model-not-served", "answer-from-another-model"],
)
def test_a_service_that_answers_wrong_keeps_ready_false(
    cluster: EmulatorServer, operator: OperatorThread, misbehave: dict[str, Any], detail: str
) -> None:
    trained(cluster, "bad")
    serve_deployment(cluster, "bad-serve")
    backend = behaviour_of(cluster, "bad-serve")
    for key, value in misbehave.items():
        setattr(backend, key, value)
    make_available(cluster, "bad-serve", answer=False)
    # Retried with backoff; one Warning after three failures in a row, not one per failure.
    warning = wait_event(cluster, "bad", c.Reason.SERVICE_NOT_ANSWERING)
    assert warning[0][0] == "Warning" and detail in warning[0][2]
    cluster.wait_for(lambda: len(backend.requests) >= 5, 30, "the check was not retried")
    status = ftj_status(cluster, "bad")
    ready = condition(status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == c.Reason.SERVICE_NOT_ANSWERING
    assert detail in ready["message"] and ready["message"].endswith("; retrying")
    assert status["state"] == "Running" and "endpoint" not in (status.get("outputs") or {})
    assert answered(cluster, "bad-serve") is None
    assert len([e for e in events(cluster, "bad") if e[1] == c.Reason.SERVICE_NOT_ANSWERING]) == 1

    # Fixed behind the Service (the same rollout): the next check passes.
    backend.status, backend.claim_model, backend.models = None, None, ("bad",)
    wait_state(cluster, "bad", "Serving")
    assert condition(ftj_status(cluster, "bad"), "Ready")["status"] == "True"


def test_a_rerun_is_checked_again_after_its_rollout(cluster: EmulatorServer, operator: OperatorThread) -> None:
    dep = trained(cluster, "rr")
    make_available(cluster, "rr-serve")
    wait_state(cluster, "rr", "Serving")
    first = answered(cluster, "rr-serve")

    cluster.patch(FTJ, "rr", {"spec": {"runId": "r2"}})
    wait_child(cluster, "Job", "rr-r2-sft")
    succeed(cluster, "Job", "rr-r2-sft")
    cluster.wait_for_object(
        "deployments.apps", "rr-serve", condition=lambda d: d["metadata"]["generation"] > dep["metadata"]["generation"]
    )
    # Rolling: the old pods answered before and still answer, Ready stays.
    wait_event(cluster, "rr", c.Reason.ROLLING_OUT)
    assert condition(ftj_status(cluster, "rr"), "Ready")["status"] == "True"
    # Rolled out to pods that do not answer: Ready is False for the new run, with the reason.
    serve_deployment(cluster, "rr-serve")
    behaviour_of(cluster, "rr-serve").status = 500
    make_available(cluster, "rr-serve", answer=False)
    status = wait_ready(cluster, "rr", "False", c.Reason.SERVICE_NOT_ANSWERING)
    assert "HTTP 500" in condition(status, "Ready")["message"] and status["run"] == "r2"
    assert answered(cluster, "rr-serve") == first  # the previous rollout's record, not this one's
    behaviour_of(cluster, "rr-serve").status = None
    status = wait_state(cluster, "rr", "Serving")
    assert status["outputs"]["adapters"] == ["/mnt/volumes/outputs/rr/r2/sft"]
    assert answered(cluster, "rr-serve") not in (None, first)


def test_without_the_proxy_permission_ready_stays_false_and_says_so(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    for obj in cluster.emulator.authorizer.objects:  # an older or edited chart: no services/proxy
        if obj["kind"] == "ClusterRole":
            obj["rules"] = [r for r in obj.get("rules") or [] if "services/proxy" not in r["resources"]]
    trained(cluster, "noproxy")
    make_available(cluster, "noproxy-serve")
    status = wait_ready(cluster, "noproxy", "False", c.Reason.SERVICE_NOT_ANSWERING)
    message = condition(status, "Ready")["message"]
    assert "HTTP 403 Forbidden" in message and 'cannot create resource "services/proxy"' in message, message
    assert behaviour_of(cluster, "noproxy-serve").requests == []


KEYED = {**SERVE, "apiKeySecretRef": {"name": "vllm-key", "key": "key"}}


def answer_job_of(server: EmulatorServer, name: str, deployment: dict[str, Any], attempt: int) -> dict[str, Any]:
    """The answer Job of the Deployment's current rollout, attempt ``attempt``, once the operator created it."""
    spec_hash = deployment["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]
    generation = (server.get("deployments.apps", f"{name}-serve") or {})["metadata"]["generation"]
    rollout = f"{deployment['metadata']['uid']}:{spec_hash}@{generation}"
    return server.wait_for_object(RESOURCE["Job"], f"{name}-answer-{short_hash(rollout)}-{attempt}")


def test_with_an_api_key_an_answer_job_checks_from_inside_the_cluster(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    dep = trained(cluster, "keyed", serve=KEYED)
    serve_deployment(cluster, "keyed-serve")
    make_available(cluster, "keyed-serve", answer=False)
    # The operator holds no key: it does not send the completion itself, it creates the answer Job.
    job = answer_job_of(cluster, "keyed", dep, 1)
    status = wait_ready(cluster, "keyed", "False", c.Reason.SERVICE_NOT_ANSWERING)
    assert f"waiting for the answer Job {job['metadata']['name']}" in condition(status, "Ready")["message"]
    assert "endpoint" not in (status.get("outputs") or {})
    assert behaviour_of(cluster, "keyed-serve").requests == []
    assert not [r for r in cluster.emulator.request_log if r.subresource == "proxy"]

    # Its pod: the worker image, the Service's cluster DNS URL, the key only as a secretKeyRef, no token.
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner["kind"] == "FineTuneJob" and owner["name"] == "keyed" and owner["controller"] is True
    assert job["metadata"]["labels"][c.LABEL_JOB] == "keyed"
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["command"][:3] == ["ftctl", "worker", "answer"]
    cmd = container["command"]
    assert cmd[cmd.index("--url") + 1] == "http://keyed-serve.default.svc:8000/v1/chat/completions"
    assert cmd[cmd.index("--model") + 1] == "keyed"
    (key_env,) = [e for e in container["env"] if e["name"] == "FT_API_KEY"]
    assert key_env == {"name": "FT_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "key"}}}

    # A failed verdict in its pod's termination message: Ready stays False with the worker's detail, retried
    # with a new Job.
    job_pod(cluster, job["metadata"]["name"], json.dumps({"answer": "failed", "detail": "HTTP 401 Unauthorized"}), 1)
    fail_child(cluster, "Job", job["metadata"]["name"])
    status = wait_ready(cluster, "keyed", "False", c.Reason.SERVICE_NOT_ANSWERING)
    cluster.wait_for(
        lambda: "HTTP 401 Unauthorized" in condition(ftj_status(cluster, "keyed"), "Ready")["message"],
        30,
        "the failed verdict is not in Ready",
    )
    assert answered(cluster, "keyed-serve") is None
    second = answer_job_of(cluster, "keyed", dep, 2)
    operator.wait_reconciled("keyed", times=1)
    ready = condition(ftj_status(cluster, "keyed"), "Ready")
    assert ready["status"] == "False" and "HTTP 401 Unauthorized" in ready["message"], ready

    # The next attempt's pod answers ok: Ready turns true for this rollout, recorded like the proxy check.
    finish_with_result(cluster, second["metadata"]["name"], {"answer": "ok"})
    status = wait_state(cluster, "keyed", "Serving")
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Ready")["message"] == (
        "the vLLM Deployment is available and its Service answered a chat completion"
    )
    assert status["outputs"]["endpoint"] == "http://keyed-serve.default.svc:8000/v1"
    spec_hash = dep["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]
    assert answered(cluster, "keyed-serve") == f"{dep['metadata']['uid']}:{spec_hash}"
    assert wait_event(cluster, "keyed", c.Reason.SERVICE_ANSWERED)
    assert behaviour_of(cluster, "keyed-serve").requests == []


def test_with_an_api_key_resuming_is_checked_again_by_a_new_answer_job(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    trained(cluster, "resumed", serve=KEYED)
    make_available(cluster, "resumed-serve", answer=False)
    first = cluster.wait_for(lambda: answer_jobs(cluster, "resumed"), 30, "no answer Job")[0]
    finish_with_result(cluster, first, {"answer": "ok"})
    wait_state(cluster, "resumed", "Serving")
    # Suspend and resume: the same Deployment and template, but a new rollout. The finished Job of the
    # first one (kept until its TTL) must not answer for it.
    cluster.patch(FTJ, "resumed", {"spec": {"suspend": True}})
    wait_state(cluster, "resumed", "Suspended")
    cluster.patch(FTJ, "resumed", {"spec": {"suspend": False}})
    cluster.wait_for_object("deployments.apps", "resumed-serve", condition=lambda d: d["spec"]["replicas"] == 1)
    make_available(cluster, "resumed-serve", answer=False)
    jobs = cluster.wait_for(
        lambda: len(answer_jobs(cluster, "resumed")) == 2 and answer_jobs(cluster, "resumed"),
        30,
        "resuming made no new answer Job",
    )
    status = wait_ready(cluster, "resumed", "False", c.Reason.SERVICE_NOT_ANSWERING)
    assert answered(cluster, "resumed-serve") is None, status
    (second,) = [j for j in jobs if j != first]
    finish_with_result(cluster, second, {"answer": "ok"})
    wait_state(cluster, "resumed", "Serving")


def answer_jobs(server: EmulatorServer, name: str) -> list[str]:
    selector = f"{c.LABEL_JOB}={name},{c.LABEL_COMPONENT}=answer"
    return sorted(j["metadata"]["name"] for j in server.list(RESOURCE["Job"], "default", label_selector=selector))


def test_an_ok_from_a_pod_that_exited_non_zero_does_not_count(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    dep = trained(cluster, "forged", serve=KEYED)
    make_available(cluster, "forged-serve", answer=False)
    job = answer_job_of(cluster, "forged", dep, 1)
    name = job["metadata"]["name"]
    # An ok from a container that exited 1 is a failure.
    job_pod(cluster, name, json.dumps({"answer": "ok"}), 1)
    fail_child(cluster, "Job", name)
    second = answer_job_of(cluster, "forged", dep, 2)
    status = ftj_status(cluster, "forged")
    assert condition(status, "Ready")["status"] == "False", condition(status, "Ready")
    assert "the answer check exited 1" in condition(status, "Ready")["message"]
    # A Job that fails without any verdict (its deadline) is a failed check too.
    fail_child(cluster, "Job", second["metadata"]["name"], reason="DeadlineExceeded")
    cluster.wait_for(
        lambda: (
            "failed without a verdict (DeadlineExceeded)"
            in condition(ftj_status(cluster, "forged"), "Ready")["message"]
        ),
        30,
        "a Job without a verdict did not fail the check",
    )
    assert answered(cluster, "forged-serve") is None


@pytest.mark.vllm
@pytest.mark.slow
def test_the_real_vllm_behind_the_service_answers_the_check(
    tiny_vllm: ServedModel, cluster: EmulatorServer, operator: OperatorThread
) -> None:
    # The real vLLM OpenAI server (CPU build, tiny model) plays the Service's pods.
    cluster.create(minimal("real", merge={"enabled": True}, serve={**SERVE, "servedModelName": tiny_vllm.name}))
    for step in ("sft", "merge"):
        wait_child(cluster, "Job", f"real-{step}")
        succeed(cluster, "Job", f"real-{step}")
    cluster.wait_for_object("services", "real-serve")
    cluster.emulator.service_backends[("default", "real-serve", "8000")] = tiny_vllm.base_url
    make_available(cluster, "real-serve", answer=False)
    status = wait_state(cluster, "real", "Serving", timeout=120)
    assert condition(status, "Ready")["status"] == "True"
    (event,) = wait_event(cluster, "real", c.Reason.SERVICE_ANSWERED)
    assert event[2] == f"Service real-serve answered a chat completion of model {tiny_vllm.name!r}"
    assert answered(cluster, "real-serve") is not None


# ------------------------------------------------------------------------------------------------ the rules


def test_only_a_well_formed_completion_of_the_model_counts() -> None:
    ok = {"object": "chat.completion", "model": "m", "choices": [{"message": {"role": "assistant", "content": ""}}]}
    assert answering.judge(200, json.dumps(ok).encode(), "m").ok
    assert answering.judge(200, json.dumps({**ok, "model": None}).encode(), "m").ok  # no model field: fine
    for body, why in [
        (b"<html>ok</html>", "not JSON"),
        (json.dumps({"choices": []}).encode(), "no choices"),
        (json.dumps({"choices": [{"text": "hi"}]}).encode(), "no message"),
        (json.dumps({**ok, "model": "other"}).encode(), "from model 'other'"),
    ]:
        answer = answering.judge(200, body, "m")
        assert not answer.ok and why in answer.detail
    # Errors are described by their status and their own reason/type and message, never the raw body.
    status = {"kind": "Status", "reason": "ServiceUnavailable", "message": "no endpoints available", "code": 503}
    assert answering.judge(503, json.dumps(status).encode(), "m").detail == (
        "HTTP 503 ServiceUnavailable: no endpoints available"
    )
    openai = {"error": {"type": "invalid_request_error", "message": "x\n" * 300}}
    detail = answering.judge(400, json.dumps(openai).encode(), "m").detail
    assert detail.startswith("HTTP 400 invalid_request_error: x x") and len(detail) < 220 and "\n" not in detail
    assert answering.judge(502, b"secret-token-in-an-html-page", "m").detail == "HTTP 502"


def test_the_check_backs_off_exponentially_up_to_the_maximum() -> None:
    assert [answering.retry_delay(n, 2.0, 60.0) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert answering.proxy_path("ml", "a-serve", 8000) == (
        "/api/v1/namespaces/ml/services/a-serve:8000/proxy/v1/chat/completions"
    )
