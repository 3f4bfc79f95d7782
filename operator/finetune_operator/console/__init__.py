"""The web console: FineTuneJobs, their stage timelines and loss curves, and a chat playground.

Small and dependable on purpose: an aiohttp server rendering HTML with jinja2 (autoescaped), one static
script that draws the curves and streams the chat, no build step and no client framework. It runs from the
operator image (``ftctl console``) with a ServiceAccount that may only get/list/watch FineTuneJobs: it shows
what ``kubectl get ftj -o yaml`` would show and never touches a Secret.

The browser never talks to the cluster: the chat playground POSTs to the console, which forwards to the job's
vLLM Service (inside the cluster by its DNS name, outside through the API server's Service proxy) and streams
the answer back as plain text.

Modules: :mod:`.source` (reading jobs), :mod:`.views` (what a page shows, pure), :mod:`.app` (routes).
"""
