"""Helpers of the API tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from flows.core.settings import PROJECT_ROOT, Settings
from flows.demo.local_stack import free_port
from tests.prefect_server import stop, tail

# Bookkeeping a request writes whatever its outcome, not a change it makes: a token's last use.
NOT_FINGERPRINTED = {("api_tokens", "last_used_at")}


def control_fingerprint(settings: Settings) -> dict[str, str]:
    """md5 of every control-schema table's rows (in a stable order), per table."""
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "select table_name from information_schema.tables where table_schema = %s "
                "and table_type = 'BASE TABLE' order by 1",
                (settings.control_schema,),
            ).fetchall()
        ]
        out = {}
        for name in names:
            columns = [
                r[0]
                for r in conn.execute(
                    "select column_name from information_schema.columns where table_schema = %s "
                    "and table_name = %s order by ordinal_position",
                    (settings.control_schema, name),
                ).fetchall()
                if (name, r[0]) not in NOT_FINGERPRINTED
            ]
            row = conn.execute(
                sql.SQL(
                    "select md5(coalesce(string_agg(t::text, '|' order by t::text), '')) "
                    "from (select {} from {}) t"
                ).format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.Identifier(settings.control_schema, name),
                )
            ).fetchone()
            assert row is not None
            out[name] = row[0]
        return out


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def api_process(
    env: dict[str, str], log_path: Path, timeout_s: float = 300, server: list[str] | None = None
) -> Iterator[str]:
    """`refresh api` (or `server`, given the port as its last argument) in its own process on a
    free port (its output in `log_path`): yields its URL once /api/openapi.json answers, stops
    it at the end. The wait is generous: the API's start (imports, migrations, the pool) on a
    loaded 2-core machine."""
    port = free_port()
    command = server or [sys.executable, "-m", "flows.cli", "api", "--no-stack", "--port"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/api/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"refresh api did not start:\n{tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
    # Every request is access-logged: a record the log formatter cannot format prints a
    # traceback per request (it did: the redaction flattened uvicorn's record arguments).
    text = log_path.read_text(errors="replace")
    if "--- Logging error ---" in text or '"GET /api/openapi.json HTTP/1.1" 200' not in text:
        pytest.fail(f"refresh api's log is not clean or has no access log:\n{tail(log_path)}")
