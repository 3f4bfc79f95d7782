"""The controller's event intake: which FineTuneJob events lead to which kind of reconcile."""

from __future__ import annotations

from typing import Any

from finetune_operator.controller import spec as specs
from finetune_operator.controller.runtime import Controller, OperatorConfig


class NoApi:
    """A Kube that must not be called: intake decides without the API."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API call {name}")


def ftj(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ml", "uid": f"uid-{name}", "resourceVersion": "1"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta, "spec": {}}


async def test_only_jobs_that_have_started_get_a_drift_check_when_first_seen() -> None:
    controller = Controller(OperatorConfig(), NoApi(), events=lambda *a: None)  # type: ignore[arg-type]
    controller.on_ftj_event("ADDED", ftj("new"))  # just created: no children yet, nothing to verify
    controller.on_ftj_event(None, ftj("running", {specs.ANNOTATION_ACCEPTED_SPEC: "{}"}))  # seen after a restart
    assert controller._deep == {("ml", "running")}
    assert len(controller.queue) == 2  # both are reconciled


def test_the_cache_keeps_what_it_has_for_the_echo_of_the_same_version() -> None:
    """A watch event with the resourceVersion already cached (the echo of our own write) is the same object:
    it is not serialised and stored again (a JSON dump of the whole object per echo)."""
    from finetune_operator.controller.kube import CachingKube

    cache = CachingKube(NoApi())  # type: ignore[arg-type]
    cache.observe("ADDED", {**ftj("j"), "status": {"state": "Running"}})
    cache.observe("MODIFIED", {**ftj("j"), "status": {"state": "would only differ if the server lied"}})
    assert (cache.peek("FineTuneJob", "ml", "j") or {})["status"] == {"state": "Running"}
    newer = ftj("j")
    newer["metadata"]["resourceVersion"] = "2"
    cache.observe("MODIFIED", {**newer, "status": {"state": "Serving"}})
    assert (cache.peek("FineTuneJob", "ml", "j") or {})["status"] == {"state": "Serving"}
