"""Derived names: readable when they fit, deterministic and unique when they must be cut."""

from __future__ import annotations

import pytest

from finetune_operator.api import naming


@pytest.mark.parametrize(
    ("parts", "reserve", "expected"),
    [
        (("qwen2-support", "sft"), 0, "qwen2-support-sft"),
        (("a", "", "b"), 0, "a-b"),
        (("x" * 30, "y" * 32), 0, "x" * 30 + "-" + "y" * 32),  # exactly 63: kept as is
    ],
)
def test_names_that_fit_are_kept(parts: tuple[str, ...], reserve: int, expected: str) -> None:
    assert naming.child_name(*parts, reserve=reserve) == expected


@pytest.mark.parametrize("reserve", [0, 5, naming.POD_SUFFIX_RESERVE])
def test_long_names_are_cut_with_a_hash(reserve: int) -> None:
    full = "a-very-long-fine-tune-job-name-for-the-support-team" + "-" + "preference-optimisation"
    name = naming.child_name(full, reserve=reserve)
    assert len(name) == naming.MAX_NAME - reserve
    assert naming.is_dns_label(name)
    assert name.endswith(naming.short_hash(full))
    # Deterministic: the operator must find the same child after a restart.
    assert name == naming.child_name(full, reserve=reserve)


def test_long_names_sharing_a_prefix_stay_distinct() -> None:
    base = "j" * 60
    assert naming.child_name(base, "sft") != naming.child_name(base, "dpo")


def test_cut_never_leaves_a_dash_before_the_hash_doubled() -> None:
    # The cut point falls right after a '-': it must not produce '--'.
    full = "ab-" * 30
    name = naming.child_name(full)
    assert "--" not in name
    assert naming.is_dns_label(name)


def test_workload_names_leave_room_for_pod_suffixes() -> None:
    name = naming.workload_name("n" * 63, "sft")
    assert len(name + "-launcher-9999") <= naming.MAX_NAME


@pytest.mark.parametrize(
    ("value", "ok"),
    [("abc", True), ("a-b-1", True), ("-a", False), ("a-", False), ("A", False), ("a_b", False), ("a" * 64, False)],
)
def test_dns_label(value: str, ok: bool) -> None:
    assert naming.is_dns_label(value) is ok
