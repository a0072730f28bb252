"""History paging on a control schema of its own: keyset pages (after a cursor) give the same
rows as offset pages, ties in start time included, and rows added meanwhile shift nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from flows.control import history
from flows.core.db import migrate
from flows.core.errors import ConfigError
from flows.core.settings import Settings, get_settings

SCHEMA = "paging_control"


@pytest.fixture(scope="module")
def paging(stack: object) -> Iterator[tuple[Settings, psycopg.Connection]]:
    settings = get_settings(control_schema=SCHEMA)
    migrate(settings)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        # 30 runs, three of them per start time (ties), each refreshing one table.
        conn.execute(
            sql.SQL(
                "insert into {r} (run_id, status, trigger, started_at, finished_at) "
                "select md5('p' || i)::uuid, 'success', 'test', "
                "timestamptz '2026-01-01' + (i / 3) * interval '1 hour', "
                "timestamptz '2026-01-01' + (i / 3) * interval '1 hour' + interval '1 minute' "
                "from generate_series(1, 30) i"
            ).format(r=sql.Identifier(SCHEMA, "refresh_runs"))
        )
        conn.execute(
            sql.SQL(
                "insert into {t} (run_id, table_name, mode, status, write_strategy, started_at, finished_at) "
                "select run_id, 'products', 'live', 'success', 'full_replace', started_at, finished_at from {r}"
            ).format(t=sql.Identifier(SCHEMA, "table_refreshes"), r=sql.Identifier(SCHEMA, "refresh_runs"))
        )
        yield settings, conn


def _keys(rows: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    return [(r["started_at"], r["run_id"]) for r in rows]


@pytest.mark.parametrize("table", [None, "products"])
def test_cursor_pages_equal_offset_pages(
    paging: tuple[Settings, psycopg.Connection], table: str | None
) -> None:
    _, conn = paging
    by_offset: list[tuple[Any, Any]] = []
    page = 1
    while True:
        got = history.read_history(conn, SCHEMA, history.HistoryQuery(table=table, page=page, page_size=4))
        assert got.total == 30
        by_offset += _keys(got.rows)
        if got.next_cursor is None:
            break
        page += 1
    first = history.read_history(conn, SCHEMA, history.HistoryQuery(table=table, page_size=4))
    by_cursor, cursor = _keys(first.rows), first.next_cursor
    while cursor is not None:
        rows, cursor = history.history_after(
            conn, SCHEMA, history.HistoryQuery(table=table, page_size=4), history.HistoryCursor.decode(cursor)
        )
        assert rows
        by_cursor += _keys(rows)
    assert by_cursor == by_offset
    assert len(set(by_cursor)) == 30  # ties in started_at: no row twice, none left out
    assert by_cursor == sorted(by_cursor, reverse=True)
    if table:
        assert all(r["flow_run_id"] is None and r["table_name"] == table for r in first.rows)


def test_a_cursor_page_does_not_shift_when_newer_runs_arrive(
    paging: tuple[Settings, psycopg.Connection],
) -> None:
    _, conn = paging
    q = history.HistoryQuery(page_size=5)
    first = history.read_history(conn, SCHEMA, q)
    assert first.next_cursor
    before, _ = history.history_after(conn, SCHEMA, q, history.HistoryCursor.decode(first.next_cursor))
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "insert into {r} (run_id, status, trigger, started_at, finished_at) "
                "values (gen_random_uuid(), 'success', 'test', '2026-02-01', '2026-02-01 00:01')"
            ).format(r=sql.Identifier(SCHEMA, "refresh_runs"))
        )
        after, _ = history.history_after(conn, SCHEMA, q, history.HistoryCursor.decode(first.next_cursor))
        assert history.read_history(conn, SCHEMA, q).total == 31
        assert _keys(after) == _keys(before)
        raise psycopg.Rollback()


@pytest.mark.parametrize(
    "bad", ["", "nope", "W10", "WyJ4IiwgInkiXQ", "WyIyMDI2LTAxLTAxVDAwOjAwOjAwIiwgIjEiXQ"]
)
def test_a_cursor_not_given_out_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ConfigError, match="cursor is not one this API gave out"):
        history.HistoryCursor.decode(bad)
