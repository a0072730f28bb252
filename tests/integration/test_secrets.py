"""No secret reaches Prefect's database, the log files, the artifacts or the control schema.

Refreshes run through the real `refresh` command against a real Prefect server with a DSN
that carries a password: one that succeeds, one whose tables fail, one with a malformed DSN.
Then every byte the server stored and every log under the state directory is scanned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from flows.core.settings import Settings, get_settings
from flows.demo.sample_data import SampleSpec, generate
from flows.engine.bigquery import make_clients
from tests.integration.pg_password import SECRET_PASSWORD, SECRET_USER, password_dsn
from tests.prefect_server import prefect_server

REFRESH = str(Path(sys.executable).parent / "refresh")
DATASET, RAW, CONTROL = "secrets", "raw_secrets", "secrets_control"
GOOD_TABLES = """
tables:
  sec_products:
    source_table: products
    write_strategy: full_replace
  sec_daily:
    source_table: daily_search_terms
    cursor_column: date
    slice_size: week
    lookback_days: 7
"""
FAILING_TABLES = """
tables:
  sec_missing:
    source_table: no_such_table
    write_strategy: full_replace
"""


@pytest.fixture(scope="module")
def prefect_home() -> Iterator[tuple[str, Path]]:
    """A `prefect server start` with its own home (and SQLite database): (api url, home)."""
    home = Path(tempfile.mkdtemp(prefix="sqp-secrets-prefect-"))
    with prefect_server(home) as url:
        yield url, home


def _run(
    settings: Settings, api: str, tmp: Path, tables_yml: str, dsn: str
) -> subprocess.CompletedProcess[str]:
    tables = tmp / f"tables-{abs(hash(tables_yml))}.yml"
    tables.write_text(tables_yml)
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "REFRESH_PG_DSN": dsn,
        "REFRESH_BQ_DATASET": DATASET,
        "REFRESH_RAW_SCHEMA": RAW,
        "REFRESH_CONTROL_SCHEMA": CONTROL,
        "REFRESH_TABLES_FILE": str(tables),
    }
    return subprocess.run(
        [REFRESH, "run", "--no-stack", "--force"], env=env, capture_output=True, text=True, timeout=400
    )


def _hits(data: bytes) -> int:
    return data.count(SECRET_PASSWORD.encode())


def test_password_is_nowhere_after_successful_and_failing_runs(
    settings: Settings, prefect_home: tuple[str, Path], tmp_path: Path
) -> None:
    api, home = prefect_home
    clients = make_clients(get_settings(bq_dataset=DATASET))
    try:
        generate(clients, SampleSpec(sqp_rows=100, weeks=2, asins=5, daily_rows=70))
    finally:
        clients.close()
    dsn = password_dsn(settings)
    ok = _run(settings, api, tmp_path, GOOD_TABLES, dsn)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    failing = _run(settings, api, tmp_path, FAILING_TABLES, dsn)
    # The earlier tables are still registered: a `warning` run whose one table failed.
    assert "sec_missing: no_such_table" in failing.stdout, failing.stdout + failing.stderr
    malformed = _run(settings, api, tmp_path, GOOD_TABLES, dsn.replace("@", "%zz@", 1))
    assert malformed.returncode == 1, malformed.stdout + malformed.stderr
    time.sleep(3)  # the server writes the last logs it was sent

    found: dict[str, int] = {}
    for result, name in ((ok, "success"), (failing, "failing"), (malformed, "malformed")):
        if n := _hits((result.stdout + result.stderr).encode()):
            found[f"output of the {name} run"] = n
    for root in (home, settings.state_dir):
        for path in root.rglob("*"):
            skip = path.is_relative_to(settings.pg_data_dir) or not path.is_file()
            if not skip and (n := _hits(path.read_bytes())):
                found[str(path)] = n
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        tables = conn.execute(
            "select table_name from information_schema.tables where table_schema = %s", (CONTROL,)
        ).fetchall()
        assert tables, "the runs wrote no audit"
        for (table,) in tables:
            row = conn.execute(
                sql.SQL("select coalesce(string_agg(t::text, ' '), '') from {} t").format(
                    sql.Identifier(CONTROL, table)
                )
            ).fetchone()
            if row and (n := _hits(row[0].encode())):
                found[f"{CONTROL}.{table}"] = n
    assert SECRET_USER in dsn
    assert not found, f"the password appears {sum(found.values())} time(s): {found}"
