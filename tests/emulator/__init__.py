"""An API server for tests: kmock's ``KubernetesEmulator`` plus the semantics kopf and kubectl rely on.

Quick start (fixtures from ``tests/emulator/fixtures.py``, registered in ``tests/conftest.py``)::

    def test_something(emulator_server, kubectl, use_kubeconfig):
        emulator_server.apply_crd('crds/')                      # CRD file/dir/dict -> discovery + columns
        emulator_server.create({'apiVersion': 'finetune.dev/v1alpha1', 'kind': 'FineTuneJob',
                                'metadata': {'name': 'j1'}, 'spec': {...}})     # namespace 'default'
        job = emulator_server.wait_for_object('jobs', 'j1-sft', condition=lambda o: o['spec'])
        emulator_server.patch_status('jobs', 'j1-sft', {'conditions': [{'type': 'Complete', 'status': 'True'}]})
        emulator_server.wait_for(lambda: emulator_server.get('ftj', 'j1')['status'].get('state') == 'Succeeded')
        kubectl('get', 'ftj')                                    # real kubectl, KUBECONFIG set

Fixtures:
    ``emulator_server``          fresh :class:`EmulatorServer` per test (background thread, 127.0.0.1, free port)
    ``session_emulator_server``  one shared for the session
    ``emulator``                 the :class:`FidelityEmulator` of ``emulator_server``
    ``kubeconfig``               path of a kubeconfig for it;  ``kube_env``: env dict with KUBECONFIG
    ``use_kubeconfig``           monkeypatches KUBECONFIG into os.environ (in-process kopf / KopfRunner)
    ``kubectl``                  ``kubectl(*args, check=True, timeout=60) -> CompletedProcess``

EmulatorServer helpers (sync; resources named like kubectl: 'jobs', 'ftj', 'batch/v1/jobs', 'jobs.batch'):
    ``url``, ``port``, ``create(obj, namespace=None)``, ``get(res, name, ns='default') -> dict | None``,
    ``list(res, ns=None, label_selector=None, field_selector=None)``, ``patch(res, name, patch, ns,
    subresource=None, content_type=merge)``, ``patch_status(res, name, status, ns)``, ``replace(res, obj, ns)``,
    ``delete(res, name, ns, propagation='Background')``, ``apply_crd(path | dict)``, ``ensure_namespace(name)``,
    ``wait_for(predicate, timeout=10) -> value`` (condition variable, no polling), ``await_for(...)`` (async),
    ``wait_for_object(res, name, ns, condition=None)``, ``wait_for_deletion(res, name, ns)``,
    ``kubeconfig(path)``, ``env(kubeconfig)``, ``fail(verbs, resource, status=..., count=..., lost=...)``,
    ``drop_watches(resource=None)``, ``call(fn, *args)`` (run on the server loop).

FidelityEmulator (``emulator_server.emulator``):
    ``request_log`` — list of ``RequestRecord(verb, group, version, resource, subresource, namespace, name)``
    for every resource request (RBAC verbs: get/list/watch/create/update/patch/delete/deletecollection);
    ``request_log_meta`` — parallel ``RequestMeta(user_agent, code)``; ``dump_request_log(path=None,
    user_agent=None) -> JSON``; ``clear_request_log()``.
    Faults: ``fail('create', 'jobs', status=409|429|500, count=2)`` rejects before storing;
    ``lost=True`` stores then answers the error (a lost response); kmock's DSL also works and behaves as a
    lost response on writes: ``emulator[kmock.action.UPDATE, kmock.resource('batch/v1/jobs')][:2] << 500``;
    ``drop_watches()`` ends open watch streams; ``watch_count(resource)``.
    ``hooks.append(fn)``: ``fn(record, body)`` runs before each resource request (may raise ``ApiError`` to
    reject it, or trigger test actions such as stopping the operator after its N-th write).
    ``register('group/version/plural', kind, ...)`` declares a resource without a CRD.  ``faults``,
    ``clear_faults()``.

RBAC (``tests.emulator.rbac``): ``uncovered(emulator.request_log, clusterrole['rules'])`` lists the distinct
requests no rule grants; ``unused(...)`` the explicit grants never exercised; ``rule_allows(rule, record)``.

Standalone (benchmarks, manual sessions): ``python -m tests.emulator --kubeconfig PATH [--crds crds/]
[--namespace NS] [--request-log PATH]`` serves until SIGINT/SIGTERM.

What is and is not emulated: tests/emulator/README.md.
"""

from .emulator import Fault, FidelityEmulator, RequestMeta, RequestRecord
from .errors import ApiError
from .runner import DEFAULT_NAMESPACES, EmulatorServer, make_emulator

__all__ = [
    "DEFAULT_NAMESPACES",
    "ApiError",
    "EmulatorServer",
    "Fault",
    "FidelityEmulator",
    "RequestMeta",
    "RequestRecord",
    "make_emulator",
]
