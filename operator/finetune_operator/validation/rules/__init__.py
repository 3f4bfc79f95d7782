"""The semantic rules, one module per topic; importing this package registers them,
sorted by :data:`ORDER`.

=================  ===============================================================================
module             decides
=================  ===============================================================================
``names``          job/namespace names, unique stage and dataset names, ``runId``
``stages``         DeepSpeed offload, stage datasets (declared, ranking or not), LoRA block, adapter chain
``graph``          models a stage names: ppo's reward model, references, ``merge.stage``
``datasets``       columns and tags per formatting, ranking pair columns
``volumes``        ``subPath`` inside its claim
``model``          template, hub id, token Secret reference
``resources``      CPU/memory quantities
``serve``          vLLM sizing, operator-owned flags, serving adapters without merge
``scheduling``     queue, priority class, node selector, tolerations
``backend``        what the chosen backend's workload API cannot express (TrainJob names, runtime)
``tracking``       experiment trackers: credentials only through ``spec.tracking``'s Secret references
``arguments``      LLaMA-Factory arguments: reserved, secret, unknown, typed, bounded, combinations
``promotion``      evaluation datasets and args, the gate's metric, publish artifact and destinations
``policy``         the install's policy: allowed images, ``trust_remote_code``
=================  ===============================================================================
"""

from __future__ import annotations

from finetune_operator.validation.registry import RULES
from finetune_operator.validation.rules import (
    arguments,
    backend,
    datasets,
    graph,
    model,
    names,
    policy,
    promotion,
    resources,
    scheduling,
    serve,
    stages,
    tracking,
    volumes,
)

#: Topic order of the errors a user reads (within a module: definition order).
ORDER = (
    names,
    stages,
    graph,
    datasets,
    volumes,
    model,
    resources,
    serve,
    scheduling,
    backend,
    tracking,
    arguments,
    promotion,
    policy,
)

RULES.sort(key=lambda func: [m.__name__ for m in ORDER].index(func.__module__))
