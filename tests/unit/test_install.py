"""The environment the tests run in: as `make install` leaves it, and how `make test` runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "module", ["prefect/__init__.py", "prefect/flows.py", "dbt/cli/main.py", "psycopg/__init__.py"]
)
def test_installed_packages_are_compiled_to_bytecode(module: str) -> None:
    # Every `refresh` subprocess and Prefect server imports these: without their bytecode on
    # disk each process compiles them from source (PYTHONDONTWRITEBYTECODE keeps it that way).
    # Found without importing them (dbt's package imports take seconds).
    spec = importlib.util.find_spec(module.split("/")[0])
    assert spec is not None and spec.submodule_search_locations
    source = next(Path(d) / module.split("/", 1)[1] for d in spec.submodule_search_locations)
    assert source.is_file(), source
    cached = Path(importlib.util.cache_from_source(str(source)))
    assert cached.is_file(), f"{module} has no bytecode at {cached}: install with --compile-bytecode"


def test_an_external_test_database_refuses_parallel_workers() -> None:
    env = {**os.environ, "SQP_TEST_PG_DSN": "postgresql://nobody@127.0.0.1:9/none"}
    args = ["-n", "2", "-p", "no:cacheprovider", "tests/unit/test_identifiers.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout[-2000:] + done.stderr[-2000:]
    assert "SQP_TEST_PG_DSN is one database for the whole session" in done.stderr


def test_the_slow_modules_dealt_first_exist_and_go_first() -> None:
    from tests.conftest import SLOW_MODULES, slow_rank

    tests_dir = Path(__file__).resolve().parents[1]
    assert [m for m in SLOW_MODULES if not (tests_dir / m).is_file()] == []
    ranks = [slow_rank(str(tests_dir / m)) for m in SLOW_MODULES]
    assert ranks == sorted(ranks) and ranks[-1] < slow_rank(str(tests_dir / "unit" / "test_install.py"))
