"""Reaching a FineTuneJob from where a person sits: the cluster's API (kubeconfig or in-cluster), the job, the
model it serves.

Used by ``ftctl chat``, ``ftctl plot --job`` and the web console. Nothing here needs network access to the
pod network: a served model is reached *through the API server's Service proxy*
(``/api/v1/namespaces/NS/services/NAME:PORT/proxy/...``) with the caller's own credentials, exactly what
``kubectl`` would do, so a user can talk to a model they are allowed to reach and no other. The console, which
runs inside the cluster, can instead talk to the Service directly (its DNS name).

Layout:
* :mod:`.cluster` — the API server's address and credentials (kubeconfig as kubectl uses it, or a pod's
  ServiceAccount), and small JSON GETs.
* :mod:`.jobs` — a job as seen from outside: whether it serves, under which model name, its loss history.
* :mod:`.openai` — the OpenAI-compatible streaming chat protocol vLLM speaks (server-sent events), decoded
  without a client library.
"""
