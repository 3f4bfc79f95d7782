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
