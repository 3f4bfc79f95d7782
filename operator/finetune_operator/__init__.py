"""finetune-operator: one FineTuneJob resource, a whole LLM fine-tuning pipeline on Kubernetes.

The package is layered (enforced by import-linter, see ``pyproject.toml``):

* :mod:`finetune_operator.api` - the typed API (pydantic models), constants, naming rules.
* :mod:`finetune_operator.validation`, :mod:`finetune_operator.render` - pure functions from a
  FineTuneJob to errors or manifests. They never import kopf or a Kubernetes client, so GitOps users
  can render offline and the operator and ``ftctl render`` produce byte-identical objects.
* :mod:`finetune_operator.controller` - the kopf operator that creates what ``render`` describes.
* :mod:`finetune_operator.worker` - what the generated pods run around LLaMA-Factory.
* :mod:`finetune_operator.local` - ``ftctl run --local``: the same worker code on one machine.
"""

__version__ = "0.1.0"
