"""The adapter chain has one implementation (``render.chain.walk``); validation and render must agree on it.

Every stage sequence of one to three stages over the methods full, lora and qlora, each with and without
DeepSpeed ZeRO-3: validation reports a chain problem exactly when the renderer refuses the sequence, and
refuses serving without merge exactly when the renderer's chain ends in more than one adapter.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from finetune_operator.api.types import FineTuneJob
from finetune_operator.errors import RenderError
from finetune_operator.render import PathResolver
from finetune_operator.render import llamafactory as lf
from finetune_operator.validation import check
from tests.test_validation import base

CHOICES = [(m, z3) for m in ("full", "lora", "qlora") for z3 in (False, True)]
SEQUENCES = [seq for n in (1, 2, 3) for seq in itertools.product(CHOICES, repeat=n)]


def test_both_outcomes_are_exercised() -> None:
    refused = [seq for seq in SEQUENCES if check(_job(seq, merge=True))[0] is None]
    assert 0 < len(refused) < len(SEQUENCES)


def _job(seq: tuple[tuple[str, bool], ...], *, merge: bool) -> dict[str, Any]:
    job = base()
    job["spec"]["stages"] = [
        {
            "name": f"s{i}",
            "type": "sft",
            "datasets": ["chat"],
            "method": method,
            **({"deepspeed": {"zeroStage": 3}} if z3 else {}),
        }
        for i, (method, z3) in enumerate(seq)
    ]
    job["spec"]["merge"] = {"enabled": merge}
    job["spec"]["serve"] = {"enabled": True}
    return job


def _ids(seq: tuple[tuple[str, bool], ...]) -> str:
    return "-".join(m + ("+z3" if z3 else "") for m, z3 in seq)


@pytest.mark.parametrize("seq", SEQUENCES, ids=[_ids(s) for s in SEQUENCES])
def test_validation_and_render_agree_on_the_chain(seq: tuple[tuple[str, bool], ...]) -> None:
    merged, errors = check(_job(seq, merge=True))
    chain_errors = [e for e in errors if e.path.endswith(".method")]
    assert [e for e in errors if e not in chain_errors] == []
    if merged is None:
        # validation refuses: render (given the same stages, bypassing validation) must refuse too
        job = FineTuneJob.model_validate(_job(seq, merge=True))
        with pytest.raises(RenderError):
            lf.chain(job, PathResolver())
        return
    chain = lf.chain(merged, PathResolver())
    _, unmerged_errors = check(_job(seq, merge=False))
    refuses_unmerged = any(e.path == "spec.merge.enabled" for e in unmerged_errors)
    assert refuses_unmerged == (len(chain.adapters) > 1)
