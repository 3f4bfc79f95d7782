"""The registry of semantic rules: each rule is a small named function from a :class:`Context` to errors.

Rules register with :func:`rule` and run in registration order (the order of the modules imported by
:mod:`finetune_operator.validation.rules`, then definition order), so errors come out grouped by topic.
Another rule is another decorated function in the module of its topic; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from finetune_operator.errors import FieldError
from finetune_operator.validation.context import Context

__all__ = ["RULES", "Rule", "rule"]

Rule = Callable[[Context], Iterable[FieldError]]
RULES: list[Rule] = []


def rule(func: Rule) -> Rule:
    """Register a semantic rule."""
    RULES.append(func)
    return func
