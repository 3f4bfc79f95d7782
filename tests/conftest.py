"""Shared pytest configuration. Fixtures live in their areas' modules and are registered here."""

from __future__ import annotations

pytest_plugins: list[str] = ["tests.emulator.fixtures", "tests.served_model"]
