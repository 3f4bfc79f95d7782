"""Re-running a FineTuneJob (a new ``spec.runId``): a second pipeline into per-run children and folders, while
the vLLM Deployment keeps serving the previous model and is then rolled (patched, never re-created) to the new.

The test plays the Job and Deployment controllers, including the rollout: after the operator patched the
Deployment's template, the old pods answer until the test reports every replica updated and available.
"""

from __future__ import annotations

import threading
from typing import Any

import yaml

from finetune_operator.api import constants as c

from . import test_operator_harness as harness
from .emulator import EmulatorServer, players
from .test_operator_harness import (
    FTJ,
    OperatorThread,
    children,
    condition,
    events,
    ftj_status,
    minimal,
    succeed,
    wait_child,
    wait_event,
    wait_state,
)

cluster = harness.cluster
operator = harness.operator

SERVE = {"enabled": True, "replicas": 1, "resources": {"gpusPerNode": 1}}
ENDPOINT = "http://rerun-serve.default.svc:8000/v1"


def finish_rollout(server: EmulatorServer, name: str) -> dict[str, Any]:
    """What the Deployment controller reports once every replica runs the current template (its pods answer
    chat completions through the Service)."""
    return players.make_available(server, name)


class ReadySampler:
    """Samples the Ready condition in the background (the events check below catches what sampling misses)."""

    def __init__(self, server: EmulatorServer, name: str) -> None:
        self.server, self.name = server, name
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.seen.add(str(condition(ftj_status(self.server, self.name), "Ready").get("status")))

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join()
        return self.seen


def test_a_new_run_id_reruns_the_pipeline_and_rolls_the_deployment(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    # Run 1 (no runId: the layout of a job that never re-ran) up to Serving.
    cluster.create(minimal("rerun", serve=SERVE))
    wait_child(cluster, "Job", "rerun-sft")
    succeed(cluster, "Job", "rerun-sft")
    dep = cluster.wait_for_object("deployments.apps", "rerun-serve")
    finish_rollout(cluster, "rerun-serve")
    first = wait_state(cluster, "rerun", "Serving")
    assert first["outputs"]["adapters"] == ["/mnt/volumes/outputs/rerun/sft"]
    assert first["outputs"]["endpoint"] == ENDPOINT
    ready_since = condition(first, "Ready")["lastTransitionTime"]
    uid = dep["metadata"]["uid"]

    # Run r2 with a changed training argument: only allowed together with a new runId.
    sampler = ReadySampler(cluster, "rerun")
    stage = {**minimal()["spec"]["stages"][0], "args": {"learning_rate": 1e-5}}
    cluster.patch(FTJ, "rerun", {"spec": {"runId": "r2", "stages": [stage]}})
    wait_event(cluster, "rerun", c.Reason.RUN_STARTED)
    new_job = wait_child(cluster, "Job", "rerun-r2-sft")
    status = cluster.wait_for(
        lambda: (s := ftj_status(cluster, "rerun")).get("currentStage") == "sft" and s.get("run") == "r2" and s
    )
    # The new run trains; the previous model still answers at the same endpoint.
    assert status["state"] == "Running"
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Progressing")["status"] == "True"
    assert condition(status, "SpecAccepted")["status"] == "True"
    assert status["outputs"]["endpoint"] == ENDPOINT
    assert status["outputs"]["adapters"] == ["/mnt/volumes/outputs/rerun/sft"]  # still the previous run's
    sft = next(s for s in status["stages"] if s["name"] == "sft")
    assert sft["state"] == "Running" and sft["attempts"] == 1 and sft["workloadName"] == "rerun-r2-sft"
    # Run-scoped children: the new run's ConfigMap and Job next to the previous run's, no duplicate.
    assert children(cluster, "rerun") == [
        ("ConfigMap", "rerun-config"),
        # One worker identity per FineTuneJob, shared by its runs.
        ("ServiceAccount", "rerun-worker"),
        ("Role", "rerun-worker"),
        ("RoleBinding", "rerun-worker"),
        ("Job", "rerun-sft"),
        ("Service", "rerun-serve"),
        ("Deployment", "rerun-serve"),  # written last: the answer check's record (after the Service)
        ("ConfigMap", "rerun-r2-config"),
        ("Job", "rerun-r2-sft"),
    ]
    config = yaml.safe_load(cluster.get("configmaps", "rerun-r2-config")["data"]["sft.yaml"])
    assert config["learning_rate"] == 1e-5
    assert config["output_dir"] == "/mnt/volumes/outputs/rerun/r2/sft"
    volumes = new_job["spec"]["template"]["spec"]["volumes"]
    assert [v["configMap"]["name"] for v in volumes if "configMap" in v] == ["rerun-r2-config"]

    # The new model is done: the same Deployment (same uid) is patched to it and rolls.
    succeed(cluster, "Job", "rerun-r2-sft")
    wait_event(cluster, "rerun", c.Reason.ROLLING_OUT)
    rolled = cluster.wait_for_object(
        "deployments.apps",
        "rerun-serve",
        condition=lambda d: (d["metadata"].get("annotations") or {}).get(c.ANNOTATION_RUN) == "r2",
    )
    assert rolled["metadata"]["uid"] == uid and rolled["metadata"]["generation"] > dep["metadata"]["generation"]
    args = rolled["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--lora-modules") + 1] == "rerun=/mnt/volumes/outputs/rerun/r2/sft"
    assert rolled["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # While it rolls the old pods serve: Ready, the endpoint, and the previous outputs stay.
    status = ftj_status(cluster, "rerun")
    assert condition(status, "Ready")["status"] == "True"
    assert status["outputs"]["adapters"] == ["/mnt/volumes/outputs/rerun/sft"]
    assert status["outputs"]["endpoint"] == ENDPOINT

    # Rolled out: the outputs switch to the new run.
    finish_rollout(cluster, "rerun-serve")
    final = cluster.wait_for(
        lambda: (
            (s := ftj_status(cluster, "rerun"))["outputs"]["adapters"] == ["/mnt/volumes/outputs/rerun/r2/sft"] and s
        )
    )
    assert sampler.stop() == {"True"}
    assert final["state"] == "Serving" and final["run"] == "r2"
    assert final["outputs"]["endpoint"] == ENDPOINT
    assert condition(final, "Ready")["lastTransitionTime"] == ready_since  # never flipped
    assert [e for e in events(cluster, "rerun") if e[1] == c.Reason.SERVING] == [
        ("Normal", c.Reason.SERVING, f"serving at {ENDPOINT}")
    ]  # Ready became True once: in run 1
    assert cluster.get("deployments.apps", "rerun-serve")["metadata"]["uid"] == uid
    assert sorted(n for k, n in children(cluster, "rerun") if k == "Deployment") == ["rerun-serve"]


def test_a_new_run_id_restarts_a_failed_pipeline_and_stops_an_unfinished_run(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("again", runId="r1", retries=0))
    wait_child(cluster, "Job", "again-r1-sft")
    harness.fail_child(cluster, "Job", "again-r1-sft")
    wait_state(cluster, "again", "Failed")

    # A new run after a failure starts over.
    cluster.patch(FTJ, "again", {"spec": {"runId": "r2"}})
    wait_child(cluster, "Job", "again-r2-sft")
    status = wait_state(cluster, "again", "Running")
    assert condition(status, "Failed")["status"] == "False"
    assert cluster.get("jobs.batch", "again-r1-sft") is not None  # a finished run is kept for inspection

    # A new run while one trains: the unfinished workload is deleted, the new one created.
    cluster.patch(FTJ, "again", {"spec": {"runId": "r3"}})
    wait_child(cluster, "Job", "again-r3-sft")
    cluster.wait_for(lambda: cluster.get("jobs.batch", "again-r2-sft") is None, message="r2 workload not deleted")
    succeed(cluster, "Job", "again-r3-sft")
    final = wait_state(cluster, "again", "Succeeded")
    assert final["outputs"]["adapters"] == ["/mnt/volumes/outputs/again/r3/sft"]
    assert final["run"] == "r3"


def test_changing_training_fields_without_a_new_run_id_is_still_refused(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("same", runId="r1"))
    wait_child(cluster, "Job", "same-r1-sft")
    cluster.patch(FTJ, "same", {"spec": {"model": {"template": "llama3"}}})
    (event,) = wait_event(cluster, "same", c.Reason.IMMUTABLE_FIELD)
    assert "spec.model" in event[2] and "spec.runId" in event[2]
    # Removing the runId is not a new run either.
    cluster.patch(FTJ, "same", {"spec": {"model": {"template": "qwen"}, "runId": None}})
    cluster.wait_for(
        lambda: "spec.runId" in condition(ftj_status(cluster, "same"), "SpecAccepted").get("message", ""),
        message="removing runId was not refused",
    )
    assert [n for k, n in children(cluster, "same") if k == "Job"] == ["same-r1-sft"]


def test_a_run_start_interrupted_before_the_spec_is_accepted_resumes_once(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("crash", runId="r1"))
    wait_child(cluster, "Job", "crash-r1-sft")
    cluster.wait_for(lambda: (ftj_status(cluster, "crash").get("stages") or [{}])[0].get("attempts") == 1)
    # The stage reset is written, then the accepted-spec write fails (409): the next try must not reset again.
    fault = cluster.fail("patch", FTJ, subresource=None, status=409)
    obj = cluster.get(FTJ, "crash")
    obj["spec"]["runId"] = "r2"
    cluster.replace(FTJ, obj)  # an update (PUT): the fault only catches the operator's patch
    wait_child(cluster, "Job", "crash-r2-sft")
    assert fault.hits == 1, "the accepted-spec write never failed"
    cluster.wait_for(lambda: cluster.get("jobs.batch", "crash-r1-sft") is None, message="r1 workload not deleted")
    status = cluster.wait_for(
        lambda: ((s := ftj_status(cluster, "crash")).get("stages") or [{}])[0].get("attempts") == 1 and s
    )
    assert status["run"] == "r2" and condition(status, "SpecAccepted")["status"] == "True"
    wait_event(cluster, "crash", c.Reason.RUN_STARTED)  # Events are posted after the status write
    assert [e[1] for e in events(cluster, "crash")].count(c.Reason.RUN_STARTED) == 1  # reset once
    succeed(cluster, "Job", "crash-r2-sft")
    assert wait_state(cluster, "crash", "Succeeded")["outputs"]["adapters"] == ["/mnt/volumes/outputs/crash/r2/sft"]


def test_a_new_run_without_serving_removes_the_previous_server(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    cluster.create(minimal("unserve", serve=SERVE))
    wait_child(cluster, "Job", "unserve-sft")
    succeed(cluster, "Job", "unserve-sft")
    cluster.wait_for_object("deployments.apps", "unserve-serve")
    finish_rollout(cluster, "unserve-serve")
    wait_state(cluster, "unserve", "Serving")

    cluster.patch(FTJ, "unserve", {"spec": {"runId": "r2", "serve": {"enabled": False}}})
    wait_child(cluster, "Job", "unserve-r2-sft")
    cluster.wait_for(
        lambda: (
            cluster.get("deployments.apps", "unserve-serve") is None
            and cluster.get("services", "unserve-serve") is None
        ),
        message="the previous server was not removed",
    )
    status = cluster.wait_for(lambda: (s := ftj_status(cluster, "unserve")).get("run") == "r2" and s)
    assert "endpoint" not in (status.get("outputs") or {})
    succeed(cluster, "Job", "unserve-r2-sft")
    final = wait_state(cluster, "unserve", "Succeeded")
    assert final["outputs"]["adapters"] == ["/mnt/volumes/outputs/unserve/r2/sft"]
    assert condition(final, "Ready")["status"] == "True" and "endpoint" not in final["outputs"]


def _revoke(cluster: EmulatorServer, group: str, resource: str, verb: str) -> None:
    """Take ``verb`` on ``group``/``resource`` out of the installed ClusterRole (an older or edited chart)."""
    auth = cluster.emulator.authorizer
    for obj in auth.objects:
        if obj["kind"] == "ClusterRole":
            for rule in obj.get("rules") or []:
                if group in rule["apiGroups"] and resource in rule["resources"]:
                    rule["verbs"] = [v for v in rule["verbs"] if v != verb]


def test_a_refused_request_is_a_condition_and_one_warning_not_a_silent_retry_loop(
    cluster: EmulatorServer, operator: OperatorThread
) -> None:
    """The re-run bug on a cluster whose RBAC lacks ``delete`` on Deployments: the 403 is reported in status
    (Progressing=False, reason Forbidden, the API server's message) with one Warning event, and retried slowly."""
    cluster.create(minimal("norbac", serve=SERVE))
    wait_child(cluster, "Job", "norbac-sft")
    succeed(cluster, "Job", "norbac-sft")
    cluster.wait_for_object("deployments.apps", "norbac-serve")
    finish_rollout(cluster, "norbac-serve")
    wait_state(cluster, "norbac", "Serving")

    _revoke(cluster, "apps", "deployments", "delete")
    # Count what the reconciler hands to the event sink (which posts asynchronously, in batches).
    posted: list[tuple[str, str]] = []
    reconciler = operator.controller.reconciler
    sink = reconciler.events

    def counting(obj: Any, type_: str, reason: str, message: str) -> None:
        if (obj.get("metadata") or {}).get("name") == "norbac":
            posted.append((type_, reason))
        sink(obj, type_, reason, message)

    reconciler.events = counting
    cluster.patch(FTJ, "norbac", {"spec": {"runId": "r2", "serve": {"enabled": False}}})
    status = cluster.wait_for(
        lambda: (cond := condition(ftj_status(cluster, "norbac"), "Progressing")).get("reason") == "Forbidden" and cond,
        message="the refusal never reached status",
    )
    assert status["status"] == "False"
    assert 'cannot delete resource "deployments" in API group "apps"' in status["message"]
    (denied,) = {(u, r.verb, r.resource) for u, r in cluster.emulator.authorizer.denied}
    assert denied == ("system:serviceaccount:finetune-system:finetune-operator", "delete", "deployments")
    (event,) = wait_event(cluster, "norbac", "Forbidden")
    assert event[0] == "Warning" and 'cannot delete resource "deployments"' in event[2]
    operator.wait_reconciled("norbac", times=3)  # resyncs come and go: still one event, no hot loop
    assert [p for p in posted if p[1] == "Forbidden"] == [("Warning", "Forbidden")]
    assert cluster.get("deployments.apps", "norbac-serve") is not None  # nothing half-done
