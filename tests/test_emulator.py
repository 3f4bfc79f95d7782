"""Tests of the API-server fidelity layer (tests/emulator/): each emulated semantic has a test here."""

from __future__ import annotations

import pytest

from tests.emulator import ApiError, EmulatorServer


def cm(name: str, **labels: str) -> dict:
    return {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': name, 'labels': labels}, 'data': {}}


def test_create_sets_server_metadata(emulator_server: EmulatorServer) -> None:
    first = emulator_server.create(cm('a'))
    second = emulator_server.create(cm('b'))
    meta = first['metadata']
    assert meta['namespace'] == 'default'
    assert meta['uid'] and meta['uid'] != second['metadata']['uid']
    assert meta['creationTimestamp'].endswith('Z')
    assert meta['generation'] == 1
    assert int(second['metadata']['resourceVersion']) > int(meta['resourceVersion'])
    with pytest.raises(ApiError) as err:
        emulator_server.create(cm('a'))
    assert err.value.code == 409 and err.value.reason == 'AlreadyExists'
