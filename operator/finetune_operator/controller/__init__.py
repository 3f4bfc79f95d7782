"""The kopf operator: drives every FineTuneJob through its steps to a serving endpoint.

Layout (kubebuilder-style: pure pieces separate from the loop that talks to the cluster)::

    handlers.py    kopf registrations (``kopf run -m finetune_operator.controller.handlers``): on.event only
    runtime.py     Controller: configuration (env/flags), the work queue, resync timer, event posting, metrics
    reconciler.py  Reconciler.reconcile(namespace, name): level-based, idempotent; the walk over the steps
    accepting.py   which spec and run the pipeline runs; terminal jobs; the validation/render cache
    stepping.py    one training step's workload: create/adopt, success, retry, failure, suspend, drift
    serving.py     the vLLM Deployment and Service: create, scale, suspend, roll to a new run
    answering.py   pure: the chat completion through the Service proxy that Ready waits for after a rollout
    writing.py     status built from the API models, when it is written, our own watch echoes, events
    context.py     what the decision modules share: config, per-reconcile scratch, enum outcomes
    queue.py       client-go style work queue: dedupe, one worker per key, delayed re-adds, error backoff
    kube.py        async REST client (retries, error hierarchy) and the informer-style CachingKube
    children.py    pure: child status per kind (every backend of the registry, and the Deployment), suspend, ownership
    status.py      pure: conditions, progress folding, printer-column summary, transition events
    spec.py        pure: which spec fields are immutable once started; the accepted spec
    metrics.py     Prometheus metrics
    rbac.py        every API permission the operator uses, as data

How a FineTuneJob moves: every trigger (its own events, a child's events, the resync timer) enqueues the
FineTuneJob's key; a worker reconciles it: validate (the same code as ``ftctl validate``), render the plan
(the same code as ``ftctl render``), look at the current step's workload, act (create / adopt / retry /
suspend / scale / advance), then write ``status`` guarded by the resourceVersion it was computed from.
See :mod:`.reconciler` for why this survives restarts between any two API calls.

RBAC: :data:`.rbac.RULES` lists every permission used (a test runs whole pipelines and checks every request
against it); :func:`.rbac.cluster_role` renders it as a ClusterRole.
"""
