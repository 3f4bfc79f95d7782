"""Tests of the API-server fidelity layer (tests/emulator/): each emulated semantic has a test here.

Requests go over real HTTP (urllib) so the status codes, headers and bodies are the ones clients see; the
kubectl tests run the real kubectl binary; the kopf test runs a real kopf operator in-process.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import kmock
import pytest
import yaml

from tests.emulator import ApiError, EmulatorServer, FidelityEmulator, make_emulator, selectors, tables
from tests.emulator import patching as patches

WIDGET_CRD = textwrap.dedent("""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.example.dev
    spec:
      group: example.dev
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd], categories: [all, examples]}
      versions:
      - name: v1
        served: true
        storage: true
        schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
        subresources: {status: {}}
        additionalPrinterColumns:
        - {name: State, type: string, jsonPath: .status.state}
        - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
        - {name: Size, type: integer, jsonPath: .spec.size}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
        - {name: Detail, type: string, jsonPath: .spec.detail, priority: 1}
    """)
WIDGETS = "/apis/example.dev/v1/namespaces/default/widgets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


# ---------------------------------------------------------------------------------------------- helpers


def call(
    server: EmulatorServer,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, decoded JSON body) for successes and errors alike."""
    data = None
    if body is not None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def watch(server: EmulatorServer, path: str, **params: str) -> tuple[str, list[dict[str, Any]]]:
    """Open a watch, read it to its end (the server ends it: timeoutSeconds/drop); (content type, events)."""
    query = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in {"watch": "true", **params}.items())
    with urllib.request.urlopen(f"{server.url}{path}?{query}", timeout=15) as response:
        return response.headers["Content-Type"], [json.loads(line) for line in response if line.strip()]


def cm(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {}}


def widget(name: str, size: int = 1, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "example.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name, "labels": labels},
        "spec": {"size": size},
    }


@pytest.fixture()
def widgets(emulator_server: EmulatorServer, tmp_path: pathlib.Path) -> pathlib.Path:
    """The Widget CRD registered (from a file, as ``kubectl apply -f crds/`` would); returns the file."""
    path = tmp_path / "widgets-crd.yaml"
    path.write_text(WIDGET_CRD)
    emulator_server.apply_crd(path)
    return path


# ---------------------------------------------------------------------------------------------- metadata


def test_create_sets_server_metadata_and_answers_201(emulator_server: EmulatorServer) -> None:
    code, first = call(emulator_server, "POST", CONFIGMAPS, cm("a"))
    assert code == 201
    second = emulator_server.create(cm("b"))
    meta = first["metadata"]
    assert meta["namespace"] == "default"  # copied from the URL
    assert meta["uid"] and meta["uid"] != second["metadata"]["uid"]
    assert meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    code, status = call(emulator_server, "POST", CONFIGMAPS, cm("a"))
    assert (code, status["reason"], status["kind"]) == (409, "AlreadyExists", "Status")
    with pytest.raises(ApiError) as err:
        emulator_server.create(cm("a"))
    assert err.value.code == 409


def test_namespaces_are_listable_and_enforced(emulator_server: EmulatorServer) -> None:
    code, body = call(emulator_server, "GET", "/api/v1/namespaces")
    assert code == 200
    assert {"default", "kube-system"} <= {ns["metadata"]["name"] for ns in body["items"]}
    code, body = call(emulator_server, "GET", "/api/v1/namespaces/default")
    assert (code, body["status"]["phase"]) == (200, "Active")
    code, body = call(emulator_server, "POST", "/api/v1/namespaces/nowhere/configmaps", cm("x"))
    assert (code, body["reason"]) == (404, "NotFound")
    code, body = call(emulator_server, "POST", CONFIGMAPS, dict(cm("x"), metadata={"name": "x", "namespace": "o"}))
    assert code == 400


def test_generation_counts_spec_changes_only(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    created = emulator_server.create(widget("w"))
    rv0 = int(created["metadata"]["resourceVersion"])
    labelled = emulator_server.patch("widgets", "w", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > rv0
    status = emulator_server.patch_status("widgets", "w", {"state": "Running"})
    assert status["metadata"]["generation"] == 1
    spec = emulator_server.patch("widgets", "w", {"spec": {"size": 2}})
    assert spec["metadata"]["generation"] == 2
    noop = emulator_server.patch("widgets", "w", {"spec": {"size": 2}})
    assert noop["metadata"]["resourceVersion"] == spec["metadata"]["resourceVersion"]  # no-op: no new version


def test_name_and_label_validation(emulator_server: EmulatorServer) -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j" * 64}, "spec": {}}
    with pytest.raises(ApiError) as err:
        emulator_server.create(job)
    assert (err.value.code, err.value.reason) == (422, "Invalid")
    with pytest.raises(ApiError):
        emulator_server.create(cm("Upper"))
    with pytest.raises(ApiError):
        emulator_server.create(cm("ok", bad="has space"))
    assert emulator_server.create(cm("ok", good="a-b_c.d"))["metadata"]["labels"] == {"good": "a-b_c.d"}


# ---------------------------------------------------------------------------------------------- concurrency


def test_put_replaces_and_conflicts_on_stale_resource_version(
    emulator_server: EmulatorServer, widgets: pathlib.Path
) -> None:
    obj = emulator_server.create(widget("w"))
    stale = json.loads(json.dumps(obj))
    obj["spec"]["size"] = 5
    code, replaced = call(emulator_server, "PUT", f"{WIDGETS}/w", obj)
    assert code == 200 and replaced["spec"] == {"size": 5} and replaced["metadata"]["generation"] == 2
    stale["spec"]["size"] = 7
    code, status = call(emulator_server, "PUT", f"{WIDGETS}/w", stale)
    assert (code, status["reason"]) == (409, "Conflict")
    assert "the object has been modified" in status["message"]
    del stale["metadata"]["resourceVersion"]
    code, status = call(emulator_server, "PUT", f"{WIDGETS}/w", stale)
    assert code == 422  # custom resources need a resourceVersion on update
    absent = dict(widget("absent"), metadata={"name": "absent", "resourceVersion": "1"})
    assert call(emulator_server, "PUT", f"{WIDGETS}/absent", absent)[0] == 404
    assert emulator_server.get("widgets", "w")["spec"] == {"size": 5}


def test_patch_optimistic_concurrency(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    obj = emulator_server.create(widget("w"))
    rv = obj["metadata"]["resourceVersion"]
    emulator_server.patch("widgets", "w", {"spec": {"size": 2}})
    code, status = call(
        emulator_server,
        "PATCH",
        f"{WIDGETS}/w",
        {"metadata": {"resourceVersion": rv}, "spec": {"size": 3}},
        patches.MERGE,
    )
    assert (code, status["reason"]) == (409, "Conflict")
    # kopf's JSON-patch with a `test` op on the resourceVersion: the real server answers 422.
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/spec/size", "value": 4},
    ]
    code, status = call(emulator_server, "PATCH", f"{WIDGETS}/w", ops, patches.JSON_PATCH)
    assert code == 422
    current = emulator_server.get("widgets", "w")
    assert current["spec"]["size"] == 2
    ops[0]["value"] = current["metadata"]["resourceVersion"]
    code, patched = call(emulator_server, "PATCH", f"{WIDGETS}/w", ops, patches.JSON_PATCH)
    assert (code, patched["spec"]["size"]) == (200, 4)


@pytest.mark.parametrize(
    ("content_type", "patch", "expected"),
    [
        (patches.MERGE, {"data": {"a": None, "c": "3"}}, {"b": "2", "c": "3"}),
        (patches.STRATEGIC, {"data": {"a": None}, "$setElementOrder/x": []}, {"b": "2"}),
        (
            patches.JSON_PATCH,
            [{"op": "remove", "path": "/data/a"}, {"op": "add", "path": "/data/d~1e", "value": "4"}],
            {"b": "2", "d/e": "4"},
        ),
        (patches.JSON_PATCH, [{"op": "move", "from": "/data/a", "path": "/data/z"}], {"b": "2", "z": "1"}),
        (patches.JSON_PATCH, [{"op": "copy", "from": "/data/a", "path": "/data/z"}], {"a": "1", "b": "2", "z": "1"}),
    ],
)
def test_patch_content_types(
    emulator_server: EmulatorServer, content_type: str, patch: Any, expected: dict[str, str]
) -> None:
    emulator_server.create(dict(cm("p"), data={"a": "1", "b": "2"}))
    code, body = call(emulator_server, "PATCH", f"{CONFIGMAPS}/p", patch, content_type)
    assert code == 200, body
    assert body["data"] == expected
    assert not any(key.startswith("$") for key in body)


def test_server_side_apply_creates_then_merges(emulator_server: EmulatorServer) -> None:
    doc = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {k: v}\n"
    code, body = call(emulator_server, "PATCH", f"{CONFIGMAPS}/ssa?fieldManager=t", doc, patches.APPLY)
    assert (code, body["data"]) == (201, {"k": "v"})
    code, body = call(
        emulator_server, "PATCH", f"{CONFIGMAPS}/ssa?fieldManager=t", doc.replace("v}", "w}"), patches.APPLY
    )
    assert (code, body["data"]) == (200, {"k": "w"})


# ---------------------------------------------------------------------------------------------- status


def test_status_subresource_split(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    code, created = call(emulator_server, "POST", WIDGETS, dict(widget("w"), status={"state": "Forged"}))
    assert code == 201 and "status" not in created  # status is not settable on create
    emulator_server.patch_status("widgets", "w", {"state": "Running"})
    code, body = call(
        emulator_server, "PATCH", f"{WIDGETS}/w", {"spec": {"size": 9}, "status": {"state": "X"}}, patches.MERGE
    )
    assert body["spec"]["size"] == 9 and body["status"] == {"state": "Running"}
    code, body = call(
        emulator_server, "PATCH", f"{WIDGETS}/w/status", {"spec": {"size": 1}, "status": {"state": "Y"}}, patches.MERGE
    )
    assert body["spec"]["size"] == 9 and body["status"] == {"state": "Y"}
    code, body = call(emulator_server, "GET", f"{WIDGETS}/w/status")
    assert code == 200 and body["status"] == {"state": "Y"}
    # Without a status subresource (ConfigMap has none) a status field is ordinary data.
    code, _ = call(emulator_server, "PATCH", f"{CONFIGMAPS}/none/status", {"status": {}}, patches.MERGE)
    assert code == 404


# ---------------------------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier=gold", {"a", "b"}),
        ("tier==gold", {"a", "b"}),
        ("tier!=gold", {"c", "d"}),
        ("tier in (gold,silver)", {"a", "b", "c"}),
        ("tier notin (gold)", {"c", "d"}),
        ("tier", {"a", "b", "c"}),
        ("!tier", {"d"}),
        ("tier=gold,zone=x", {"a"}),
        ("tier in (gold, silver),!zone", {"b", "c"}),
    ],
)
def test_label_selectors(emulator_server: EmulatorServer, selector: str, expected: set[str]) -> None:
    for name, labels in {
        "a": {"tier": "gold", "zone": "x"},
        "b": {"tier": "gold"},
        "c": {"tier": "silver"},
        "d": {},
    }.items():
        emulator_server.create(cm(name, **labels))
    code, body = call(emulator_server, "GET", f"{CONFIGMAPS}?labelSelector={urllib.request.quote(selector)}")
    assert code == 200
    assert {item["metadata"]["name"] for item in body["items"]} == expected


def test_field_selectors(emulator_server: EmulatorServer) -> None:
    emulator_server.ensure_namespace("other")
    emulator_server.create(cm("a"))
    emulator_server.create(cm("b"))
    emulator_server.create(cm("a"), namespace="other")
    code, body = call(emulator_server, "GET", "/api/v1/configmaps?fieldSelector=metadata.name%3Da")
    assert sorted(i["metadata"]["namespace"] for i in body["items"]) == ["default", "other"]
    code, body = call(emulator_server, "GET", "/api/v1/configmaps?fieldSelector=metadata.namespace!%3Ddefault")
    assert [i["metadata"]["namespace"] for i in body["items"]] == ["other"]
    code, body = call(emulator_server, "GET", f"{CONFIGMAPS}?fieldSelector=spec.foo%3Dbar")
    assert (code, body["reason"]) == (400, "BadRequest")
    with pytest.raises(ApiError):
        selectors.parse_label_selector("a in b")


# ---------------------------------------------------------------------------------------------- watch


def test_watch_from_resource_version_with_timeout(emulator_server: EmulatorServer) -> None:
    emulator_server.create(cm("old"))
    _, listing = call(emulator_server, "GET", CONFIGMAPS)
    since = listing["metadata"]["resourceVersion"]
    emulator_server.create(cm("new"))
    emulator_server.patch("configmaps", "old", {"data": {"x": "1"}})
    emulator_server.delete("configmaps", "new")
    content_type, events = watch(emulator_server, CONFIGMAPS, resourceVersion=since, timeoutSeconds="1")
    assert content_type.startswith("application/json")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "new"),
        ("MODIFIED", "old"),
        ("DELETED", "new"),
    ]
    # Without a resourceVersion: the current state as ADDED, then (nothing more before the timeout).
    _, events = watch(emulator_server, CONFIGMAPS, timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "old")]


def test_watch_too_old_resource_version_is_gone() -> None:
    with EmulatorServer(make_emulator(history_limit=2)) as server:
        start = server.create(cm("a"))["metadata"]["resourceVersion"]
        for i in range(4):
            server.patch("configmaps", "a", {"data": {"i": str(i)}})
        _, events = watch(server, CONFIGMAPS, resourceVersion=start, timeoutSeconds="1")
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]


def test_watch_live_events_and_selector_transitions(emulator_server: EmulatorServer) -> None:
    emulator_server.create(cm("a", tier="gold"))
    result: dict[str, Any] = {}

    def reader() -> None:
        result["events"] = watch(emulator_server, CONFIGMAPS, labelSelector="tier=gold", timeoutSeconds="5")[1]

    thread = threading.Thread(target=reader)
    emulator = emulator_server.emulator
    thread.start()
    emulator_server.wait_for(lambda: emulator.watch_count("configmaps") == 1)
    emulator_server.patch("configmaps", "a", {"data": {"v": "1"}})
    emulator_server.patch("configmaps", "a", {"metadata": {"labels": {"tier": "iron"}}})  # leaves the selection
    emulator_server.create(cm("b", tier="iron"))  # never selected
    emulator_server.patch("configmaps", "b", {"metadata": {"labels": {"tier": "gold"}}})  # enters it
    assert emulator_server.drop_watches() == 1
    thread.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in result["events"]] == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "a"),
        ("ADDED", "b"),
    ]


def test_writes_from_test_threads_reach_open_watches(
    emulator_server: EmulatorServer, emulator: FidelityEmulator
) -> None:
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(events=watch(emulator_server, CONFIGMAPS, timeoutSeconds="10")[1])
    )
    thread.start()
    emulator_server.wait_for(lambda: emulator.watch_count("configmaps") == 1)
    emulator.create_object("", "v1", "configmaps", "default", cm("direct"))  # not marshalled onto the loop
    emulator_server.wait_for(lambda: emulator.find("", "configmaps", "default", "direct"))
    emulator.drop_watches()  # from this thread too
    thread.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in result["events"]] == [("ADDED", "direct")]


def test_watch_initial_events_bookmark(emulator_server: EmulatorServer) -> None:
    emulator_server.create(cm("a"))
    _, events = watch(
        emulator_server,
        CONFIGMAPS,
        sendInitialEvents="true",
        allowWatchBookmarks="true",
        resourceVersionMatch="NotOlderThan",
        timeoutSeconds="1",
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# ---------------------------------------------------------------------------------------------- GC, finalizers


def owned(name: str, owner: dict[str, Any], kind: str = "ConfigMap") -> dict[str, Any]:
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    obj = cm(name) if kind == "ConfigMap" else {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
    obj["metadata"]["ownerReferences"] = [ref]
    return obj


def test_garbage_collection_cascades(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    owner = emulator_server.create(widget("w"))
    child = emulator_server.create(owned("child", owner))
    emulator_server.create(owned("grandchild", child, kind="Secret"))
    other = emulator_server.create(widget("other"))
    shared = owned("shared", owner)
    shared["metadata"]["ownerReferences"].append(owned("x", other)["metadata"]["ownerReferences"][0])
    emulator_server.create(shared)
    code, body = call(emulator_server, "DELETE", f"{WIDGETS}/w")
    assert code == 200 and body["metadata"]["name"] == "w"
    emulator_server.wait_for_deletion("configmaps", "child")
    emulator_server.wait_for_deletion("secrets", "grandchild")
    survivor = emulator_server.wait_for_object(
        "configmaps", "shared", condition=lambda o: len(o["metadata"]["ownerReferences"]) == 1
    )
    assert survivor["metadata"]["ownerReferences"][0]["name"] == "other"


def test_orphan_and_foreground_propagation(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    owner = emulator_server.create(widget("w"))
    emulator_server.create(owned("child", owner))
    emulator_server.delete("widgets", "w", propagation="Orphan")
    emulator_server.wait_for_deletion("widgets", "w")
    assert "ownerReferences" not in emulator_server.get("configmaps", "child")["metadata"]
    owner = emulator_server.create(widget("f"))
    emulator_server.create(owned("fchild", owner))
    deleting = emulator_server.delete("widgets", "f", propagation="Foreground")
    assert deleting["metadata"]["deletionTimestamp"]
    emulator_server.wait_for_deletion("configmaps", "fchild")
    emulator_server.wait_for_deletion("widgets", "f")


def test_finalizers_hold_deletion(emulator_server: EmulatorServer) -> None:
    obj = cm("f")
    obj["metadata"]["finalizers"] = ["example.dev/cleanup"]
    emulator_server.create(obj)
    code, body = call(emulator_server, "DELETE", f"{CONFIGMAPS}/f")
    assert code == 202 and body["metadata"]["deletionTimestamp"]
    assert emulator_server.get("configmaps", "f") is not None
    code, body = call(
        emulator_server,
        "PATCH",
        f"{CONFIGMAPS}/f",
        {"metadata": {"finalizers": ["example.dev/cleanup", "new/one"]}},
        patches.MERGE,
    )
    assert code == 422  # no new finalizers on a deleting object
    code, body = call(emulator_server, "PATCH", f"{CONFIGMAPS}/f", {"metadata": {"finalizers": None}}, patches.MERGE)
    assert code == 200
    assert emulator_server.get("configmaps", "f") is None


def test_namespace_deletion_empties_it(emulator_server: EmulatorServer) -> None:
    emulator_server.ensure_namespace("team")
    emulator_server.create(cm("a"), namespace="team")
    emulator_server.delete("namespaces", "team", None)
    emulator_server.wait_for_deletion("namespaces", "team", None)
    assert emulator_server.get("configmaps", "a", "team") is None


# ---------------------------------------------------------------------------------------------- CRDs, tables


def test_crd_registration_and_removal(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    code, body = call(emulator_server, "GET", "/apis/example.dev/v1")
    resources = {r["name"]: r for r in body["resources"]}
    assert resources["widgets"]["shortNames"] == ["wd"]
    assert resources["widgets"]["categories"] == ["all", "examples"]
    assert "shortNames" not in resources["widgets/status"]
    crd = emulator_server.get("crd", "widgets.example.dev", None)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    emulator_server.create(widget("w"))
    emulator_server.delete("crd", "widgets.example.dev", None)
    code, _ = call(emulator_server, "GET", WIDGETS)
    assert code == 404
    code, _ = call(emulator_server, "GET", "/apis/example.dev/v1")
    assert code == 404


def test_table_rendering(emulator_server: EmulatorServer, widgets: pathlib.Path) -> None:
    emulator_server.create(widget("w", size=3))
    emulator_server.patch_status(
        "widgets", "w", {"state": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    )
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    code, table = call(emulator_server, "GET", WIDGETS, headers={"Accept": accept})
    assert (code, table["kind"]) == (200, "Table")
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "State", "Ready", "Size", "Age", "Detail"]
    assert table["rows"][0]["cells"][:4] == ["w", "Running", "True", 3]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (".spec.size", [3]),
        (".spec.items[1].name", ["b"]),
        (".spec.items[-1].name", ["b"]),
        (".spec.items[*].name", ["a", "b"]),
        (".spec.items[-1:].name", ["b"]),
        (".spec.items[:1].name", ["a"]),
        ('.status.conditions[?(@.type=="Ready")].status', ["True"]),
        ('.status.conditions[?(@.type!="Ready")].type', ["Failed"]),
        (".metadata.labels['app.kubernetes.io/name']", ["x"]),
        (".missing.field", []),
    ],
)
def test_jsonpath_subset(path: str, expected: list[Any]) -> None:
    obj = {
        "metadata": {"labels": {"app.kubernetes.io/name": "x"}},
        "spec": {"size": 3, "items": [{"name": "a"}, {"name": "b"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Failed", "status": "False"}]},
    }
    assert tables.jsonpath(obj, path) == expected


# ---------------------------------------------------------------------------------------------- kubectl


def test_kubectl_end_to_end(
    emulator_server: EmulatorServer, kubectl: Callable[..., subprocess.CompletedProcess[str]], tmp_path: pathlib.Path
) -> None:
    crd = tmp_path / "crds"
    crd.mkdir()
    (crd / "widgets.yaml").write_text(WIDGET_CRD)
    manifest = tmp_path / "w1.yaml"
    manifest.write_text(
        "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w1, labels: {tier: gold}}\n"
        "spec: {size: 3, detail: hello}\n"
    )
    assert "created" in kubectl("apply", "-f", str(crd)).stdout  # default (strict) validation works
    kubectl("wait", "--for=condition=established", "crd/widgets.example.dev", "--timeout=10s")
    kubectl("apply", "--validate=false", "-f", str(manifest))
    assert "unchanged" in kubectl("apply", "-f", str(manifest)).stdout
    lines = kubectl("get", "wd").stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "READY", "SIZE", "AGE"]
    assert lines[1].split()[:2] == ["w1", "3"]
    assert kubectl("get", "widgets", "-o", "wide").stdout.splitlines()[0].split()[-1] == "DETAIL"
    assert "w1" in kubectl("get", "widgets", "-l", "tier=gold").stdout
    assert "No resources found" in kubectl("get", "widgets", "-l", "tier!=gold").stderr
    kubectl(
        "patch",
        "wd",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"state":"Running","conditions":[{"type":"Ready","status":"True"}]}}',
    )
    assert "condition met" in kubectl("wait", "--for=condition=Ready", "wd/w1", "--timeout=10s").stdout
    watched = kubectl("get", "wd", "-w", "--request-timeout=2s").stdout.splitlines()
    assert watched[0].split()[:3] == ["NAME", "STATE", "READY"] and watched[1].split()[:3] == ["w1", "Running", "True"]
    assert kubectl("get", "wd", "w1", "-o", "jsonpath={.metadata.generation}").stdout == "1"
    kubectl("label", "wd", "w1", "extra=yes")
    assert "Tier" not in kubectl("describe", "wd", "w1").stderr
    api_resources = kubectl("api-resources").stdout
    assert any(line.split()[:3] == ["widgets", "wd", "example.dev/v1"] for line in api_resources.splitlines())
    assert "deleted" in kubectl("delete", "wd", "w1").stdout
    assert "No resources found" in kubectl("get", "wd").stderr


def test_kubectl_builtin_apply_and_replace(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], tmp_path: pathlib.Path
) -> None:
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text(
        textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          replicas: 1
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec: {containers: [{name: c, image: nginx}]}
        """)
    )
    kubectl("apply", "-f", str(manifest))
    manifest.write_text(manifest.read_text().replace("replicas: 1", "replicas: 2"))
    kubectl("apply", "-f", str(manifest))
    assert kubectl("get", "deploy", "web", "-o", "jsonpath={.spec.replicas}/{.metadata.generation}").stdout == "2/2"
    kubectl("replace", "-f", str(manifest))
    kubectl("scale", "deploy", "web", "--replicas=3", check=False)  # scale subresource: not emulated, no crash


# ---------------------------------------------------------------------------------------------- faults, log


def test_injected_rejection_stores_nothing(emulator_server: EmulatorServer) -> None:
    fault = emulator_server.fail("create", "configmaps", status=409, count=2)
    assert call(emulator_server, "POST", CONFIGMAPS, cm("a"))[0] == 409
    assert emulator_server.get("configmaps", "a") is None
    assert call(emulator_server, "POST", CONFIGMAPS, cm("a"))[0] == 409
    assert call(emulator_server, "POST", CONFIGMAPS, cm("a"))[0] == 201
    assert fault.hits == 2 and fault.exhausted
    emulator_server.fail(["patch", "update"], "configmaps", status=429, retry_after=2)
    request = urllib.request.Request(
        f"{emulator_server.url}{CONFIGMAPS}/a",
        data=b'{"data":{"x":"1"}}',
        method="PATCH",
        headers={"Content-Type": patches.MERGE},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 429 and err.value.headers["Retry-After"] == "2"
    assert emulator_server.get("configmaps", "a")["data"] == {}


def test_request_hooks_can_reject_and_observe(emulator_server: EmulatorServer, emulator: FidelityEmulator) -> None:
    from tests.emulator.errors import conflict

    seen: list[tuple[str, str | None]] = []

    def hook(record: Any, body: Any) -> None:
        seen.append((record.verb, (body or {}).get("metadata", {}).get("name")))
        if record.verb == "create" and body["metadata"]["name"] == "bad":
            raise conflict("configmaps", "", "bad", "rejected by a test hook")

    emulator.hooks.append(hook)
    assert call(emulator_server, "POST", CONFIGMAPS, cm("good"))[0] == 201
    code, status = call(emulator_server, "POST", CONFIGMAPS, cm("bad"))
    assert (code, status["reason"]) == (409, "Conflict") and "rejected by a test hook" in status["message"]
    assert emulator_server.get("configmaps", "bad") is None
    assert seen == [("create", "good"), ("create", "bad")]


def test_injected_lost_responses(emulator_server: EmulatorServer, emulator: FidelityEmulator) -> None:
    emulator_server.fail("create", "configmaps", status=500, lost=True)
    code, body = call(emulator_server, "POST", CONFIGMAPS, cm("a"))
    assert (code, body["reason"]) == (500, "InternalError")
    assert emulator_server.get("configmaps", "a") is not None  # stored, although the client saw an error
    # The kmock DSL works too; on writes it answers after storing (a lost response).
    emulator[kmock.action.UPDATE, kmock.resource("v1/configmaps")][:1] << 503
    code, _ = call(emulator_server, "PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "v"}}, patches.MERGE)
    assert code == 503
    assert emulator_server.get("configmaps", "a")["data"] == {"k": "v"}
    code, _ = call(emulator_server, "PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "w"}}, patches.MERGE)
    assert code == 200


def test_request_log(emulator_server: EmulatorServer, emulator: FidelityEmulator, tmp_path: pathlib.Path) -> None:
    emulator.clear_request_log()
    call(emulator_server, "POST", CONFIGMAPS, cm("a"))
    call(emulator_server, "GET", f"{CONFIGMAPS}/a")
    call(emulator_server, "PATCH", f"{CONFIGMAPS}/a", {"data": {}}, patches.MERGE)
    call(emulator_server, "GET", "/api/v1/configmaps")
    call(emulator_server, "GET", "/apis")  # discovery: not a resource request, not logged
    assert [tuple(r) for r in emulator.request_log] == [
        ("create", "", "v1", "configmaps", None, "default", None),
        ("get", "", "v1", "configmaps", None, "default", "a"),
        ("patch", "", "v1", "configmaps", None, "default", "a"),
        ("list", "", "v1", "configmaps", None, None, None),
    ]
    assert [m.code for m in emulator.request_log_meta] == [201, 200, 200, 200]
    dumped = json.loads(emulator.dump_request_log(str(tmp_path / "log.json"), user_agent="Python-urllib"))
    assert len(dumped) == 4 and dumped[0]["verb"] == "create"
    assert json.loads((tmp_path / "log.json").read_text()) == dumped
    assert emulator.dump_request_log(user_agent="kopf") == "[]"


async def test_async_tests_can_use_the_server(emulator_server: EmulatorServer) -> None:
    emulator_server.create(cm("a"))
    thread = threading.Thread(target=emulator_server.patch, args=("configmaps", "a", {"data": {"done": "y"}}))
    thread.start()
    obj = await emulator_server.await_for(
        lambda: (o := emulator_server.get("configmaps", "a")) is not None and o.get("data", {}).get("done") and o
    )
    thread.join()
    assert obj["data"] == {"done": "y"}


# ---------------------------------------------------------------------------------------------- kopf


KOPF_OPERATOR = textwrap.dedent("""\
    import kopf
    import kubernetes

    @kopf.on.login()  # explicit: the test runs this operator with a registry of its own (no fallback logins)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup()
    def configure(settings, **_):
        settings.watching.server_timeout = 30
        settings.persistence.finalizer = 'example.dev/finalizer'
        kubernetes.config.load_kube_config()

    @kopf.on.create('example.dev', 'v1', 'widgets')
    def create_fn(body, name, namespace, patch, **_):
        child = {'apiVersion': 'v1', 'kind': 'ConfigMap',
                 'metadata': {'name': f'{name}-child', 'labels': {'app': name}},
                 'data': {'size': str(body['spec']['size'])}}
        kopf.adopt(child)
        kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, child)
        patch.status['state'] = 'Created'
        return {'child': child['metadata']['name']}

    @kopf.on.update('example.dev', 'v1', 'widgets', field='spec.size')
    def resize(name, namespace, new, **_):
        kubernetes.client.CoreV1Api().patch_namespaced_config_map(
            f'{name}-child', namespace, {'data': {'size': str(new)}})

    @kopf.on.delete('example.dev', 'v1', 'widgets')
    def delete_fn(name, **_):
        pass  # a deletion handler makes kopf hold the object with its finalizer until this ran
    """)


def test_kopf_operator_smoke(
    emulator_server: EmulatorServer,
    widgets: pathlib.Path,
    use_kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
) -> None:
    import kopf
    from kopf.testing import KopfRunner

    operator = tmp_path / "widget_operator.py"
    operator.write_text(KOPF_OPERATOR)
    # A registry of its own: kopf's default one is process-wide, and an earlier test in this process may have
    # imported finetune-operator's handlers into it (they would run here too, with their settings).
    previous = kopf.get_default_registry()
    kopf.set_default_registry(kopf.OperatorRegistry())
    request.addfinalizer(lambda: kopf.set_default_registry(previous))
    with KopfRunner(["run", "--all-namespaces", "--standalone", str(operator)], timeout=60) as runner:
        emulator_server.create(widget("w", size=3))
        child = emulator_server.wait_for_object("configmaps", "w-child", timeout=20)
        assert child["data"] == {"size": "3"}
        assert child["metadata"]["ownerReferences"][0]["kind"] == "Widget"
        done = emulator_server.wait_for_object(
            "widgets", "w", condition=lambda o: o.get("status", {}).get("state") == "Created", timeout=20
        )
        assert done["status"]["create_fn"] == {"child": "w-child"}
        assert "example.dev/finalizer" in done["metadata"]["finalizers"]
        emulator_server.patch("widgets", "w", {"spec": {"size": 5}})
        emulator_server.wait_for_object(
            "configmaps", "w-child", condition=lambda o: o["data"]["size"] == "5", timeout=20
        )
        emulator_server.delete("widgets", "w")
        emulator_server.wait_for_deletion("widgets", "w", timeout=20)  # kopf ran delete_fn, removed its finalizer
        emulator_server.wait_for_deletion("configmaps", "w-child", timeout=20)  # then the GC took the child
    assert runner.exception is None
    assert "Traceback" not in runner.output


# ---------------------------------------------------------------------------------------------- more API surface

REPO = pathlib.Path(__file__).resolve().parent.parent
FTJ_CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"


@pytest.mark.skipif(not FTJ_CRD.exists(), reason="the FineTuneJob CRD is not generated yet")
def test_finetunejob_crd_with_kubectl(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], emulator_server: EmulatorServer
) -> None:
    kubectl("apply", "-f", str(FTJ_CRD.parent))
    kubectl("wait", "--for=condition=established", "crd/finetunejobs.finetune.dev", "--timeout=10s")
    examples = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
    examples = [e for e in examples if "kind: FineTuneJob" in e.read_text()]
    if not examples:
        pytest.skip("no FineTuneJob example manifest yet")
    for doc in yaml.safe_load_all(examples[0].read_text()):
        if doc and doc.get("metadata", {}).get("namespace"):
            emulator_server.ensure_namespace(doc["metadata"]["namespace"])
    kubectl("apply", "-f", str(examples[0]))
    name = emulator_server.list("ftj")[0]["metadata"]["name"]
    namespace = emulator_server.list("ftj")[0]["metadata"]["namespace"]
    emulator_server.patch_status(
        "ftj", name, {"currentStage": "sft", "state": "Running", "progress": "12/100 (12%)", "loss": "1.234"}, namespace
    )
    lines = kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "STAGE", "STATE", "PROGRESS", "LOSS", "METRIC", "AGE"]
    assert lines[1].split()[:6] == [name, "sft", "Running", "12/100", "(12%)", "1.234"]


def test_events_of_both_apis_are_storable(emulator_server: EmulatorServer) -> None:
    target = emulator_server.create(cm("target"))
    core = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "target.1"},
        "type": "Normal",
        "reason": "Created",
        "message": "hello",
        "involvedObject": {
            "kind": "ConfigMap",
            "name": "target",
            "namespace": "default",
            "uid": target["metadata"]["uid"],
        },
    }
    modern = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "target.2"},
        "type": "Warning",
        "reason": "Broke",
        "note": "oops",
        "action": "Check",
        "reportingController": "x",
        "reportingInstance": "x-1",
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"kind": "ConfigMap", "name": "target", "namespace": "default"},
    }
    emulator_server.create(core)
    emulator_server.create(modern)
    code, body = call(
        emulator_server,
        "GET",
        "/api/v1/namespaces/default/events?fieldSelector="
        + urllib.request.quote("involvedObject.name=target,reason=Created"),
    )
    assert code == 200 and [e["message"] for e in body["items"]] == ["hello"]
    code, body = call(emulator_server, "GET", "/apis/events.k8s.io/v1/namespaces/default/events")
    assert [e["note"] for e in body["items"]] == ["oops"]


def test_deletecollection_and_dry_run(emulator_server: EmulatorServer) -> None:
    for name, tier in (("a", "x"), ("b", "x"), ("c", "y")):
        emulator_server.create(cm(name, tier=tier))
    code, body = call(emulator_server, "POST", f"{CONFIGMAPS}?dryRun=All", cm("dry"))
    assert code == 201 and body["metadata"]["name"] == "dry"
    assert emulator_server.get("configmaps", "dry") is None
    code, _ = call(emulator_server, "DELETE", f"{CONFIGMAPS}?labelSelector=tier%3Dx")
    assert code == 200
    emulator_server.wait_for(lambda: [o["metadata"]["name"] for o in emulator_server.list("configmaps")] == ["c"])


def test_kmock_dsl_drops_a_watch(emulator_server: EmulatorServer, emulator: FidelityEmulator) -> None:
    emulator_server.create(cm("a"))
    emulator[kmock.action.WATCH, kmock.resource("v1/configmaps")][:1] << (b"", StopIteration)
    assert watch(emulator_server, CONFIGMAPS, timeoutSeconds="5")[1] == []  # dropped at once
    assert [e["type"] for e in watch(emulator_server, CONFIGMAPS, timeoutSeconds="1")[1]] == ["ADDED"]


def test_python_clients(emulator_server: EmulatorServer, widgets: pathlib.Path, kubeconfig: pathlib.Path) -> None:
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(client)
    created = custom.create_namespaced_custom_object("example.dev", "v1", "default", "widgets", widget("w", 2))
    assert created["metadata"]["uid"]  # a 201 with a body: the client returns it
    listed = custom.list_namespaced_custom_object("example.dev", "v1", "default", "widgets", label_selector="a=b")
    assert listed["items"] == []
    custom.patch_namespaced_custom_object_status(
        "example.dev", "v1", "default", "widgets", "w", {"status": {"state": "Ok"}}
    )
    stream = kubernetes.watch.Watch().stream(
        custom.list_namespaced_custom_object, "example.dev", "v1", "default", "widgets", timeout_seconds=1
    )
    assert [(e["type"], e["object"]["status"]["state"]) for e in stream] == [("ADDED", "Ok")]
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.create_namespaced_custom_object("example.dev", "v1", "default", "widgets", widget("w", 2))
    assert err.value.status == 409


def test_kubectl_get_watch_sees_live_changes(
    emulator_server: EmulatorServer, widgets: pathlib.Path, kube_env: dict[str, str]
) -> None:
    from tests.emulator.fixtures import kubectl_binary

    emulator_server.create(widget("w1", size=1))
    process = subprocess.Popen(
        [kubectl_binary(), "get", "widgets", "-w", "--request-timeout=3s"],
        env=kube_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        emulator_server.wait_for(lambda: emulator_server.emulator.watch_count("widgets") == 1, timeout=20)
        emulator_server.patch_status("widgets", "w1", {"state": "Running"})
        emulator_server.create(widget("w2", size=2))
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:4] == ["NAME", "STATE", "READY", "SIZE"], err
    assert [row[:2] for row in rows[1:]] == [["w1", "1"], ["w1", "Running"], ["w2", "2"]], out


def test_rbac_comparison_of_the_request_log(emulator_server: EmulatorServer, emulator: FidelityEmulator) -> None:
    from tests.emulator import rbac

    emulator.clear_request_log()
    emulator_server.create(cm("a"))
    call(emulator_server, "POST", CONFIGMAPS, cm("b"))
    call(emulator_server, "GET", f"{CONFIGMAPS}/b")
    call(emulator_server, "PATCH", f"{CONFIGMAPS}/b", {"data": {}}, patches.MERGE)
    call(emulator_server, "GET", "/api/v1/namespaces/default/pods?watch=true&resourceVersion=1")  # 410 at once
    rules = [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "list"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["watch"], "resourceNames": ["p"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["delete"]},
    ]
    missing = rbac.uncovered(emulator.request_log, rules)  # helper calls are in-process: not logged
    assert [(r.verb, r.resource) for r in missing] == [("patch", "configmaps"), ("watch", "pods")]
    assert rbac.uncovered(emulator.request_log, [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]) == []
    assert ("apps", "deployments", "delete") in rbac.unused(emulator.request_log, rules)
    assert ("", "configmaps", "list") in rbac.unused(emulator.request_log, rules)
    status = emulator.request_log[0]._replace(verb="patch", subresource="status", name="b")
    assert rbac.rule_allows({"apiGroups": [""], "resources": ["configmaps/status"], "verbs": ["patch"]}, status)
    assert not rbac.rule_allows({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"]}, status)


def test_standalone_server_process(tmp_path: pathlib.Path) -> None:
    import signal
    import sys

    widgets = tmp_path / "widgets.yaml"
    widgets.write_text(WIDGET_CRD)
    kubeconfig = tmp_path / "standalone.kubeconfig"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.emulator",
            "--kubeconfig",
            str(kubeconfig),
            "--crds",
            str(widgets),
            "--namespace",
            "team",
            "--request-log",
            str(tmp_path / "log.json"),
        ],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # printed once the server listens
        assert "emulator listening on http://127.0.0.1:" in banner
        url = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        with urllib.request.urlopen(f"{url}/apis/example.dev/v1/namespaces/team/widgets", timeout=10) as response:
            assert json.loads(response.read())["items"] == []
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert json.loads((tmp_path / "log.json").read_text())[0]["resource"] == "widgets"


def test_pytorchjob_state_column(emulator_server: EmulatorServer) -> None:
    emulator_server.create(
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "pt"},
            "spec": {"pytorchReplicaSpecs": {}},
        }
    )
    emulator_server.patch_status(
        "pytorchjobs",
        "pt",
        {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]},
    )
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io"
    _, table = call(
        emulator_server, "GET", "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs", headers={"Accept": accept}
    )
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "State", "Age"]
    assert table["rows"][0]["cells"][:2] == ["pt", "Running"]
