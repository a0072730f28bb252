"""The installed environment as `make install` leaves it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["prefect", "dbt.cli.main", "psycopg", "fastapi"])
def test_installed_packages_are_compiled_to_bytecode(module: str) -> None:
    # Every `refresh` subprocess and Prefect server imports these: without their bytecode on
    # disk each process compiles them from source (PYTHONDONTWRITEBYTECODE keeps it that way).
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    cached = Path(importlib.util.cache_from_source(spec.origin))
    assert cached.is_file(), f"{module} has no bytecode at {cached}: install with --compile-bytecode"
