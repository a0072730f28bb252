"""A dry run writes nothing but its own run record, and records the plan it prints."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from flows.core.settings import Settings

_SYSTEM = ("pg_catalog", "information_schema", "pg_toast")


def snapshot(conn: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """Row count and an order-independent checksum of every table in every schema."""
    tables = conn.execute(
        "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where c.relkind in ('r', 'p', 'm') and n.nspname <> all(%s) and n.nspname not like 'pg_temp%%' "
        "order by 1, 2",
        (list(_SYSTEM),),
    ).fetchall()
    out = {}
    for schema, table in tables:
        row = conn.execute(
            sql.SQL(
                "select count(*), coalesce(md5(string_agg(h, '' order by h)), '') from "
                "(select md5(t::text) as h from {} t) s"
            ).format(sql.Identifier(schema, table))
        ).fetchone()
        assert row is not None
        out[f"{schema}.{table}"] = (row[0], row[1])
    return out


def test_dry_run_changes_nothing_but_its_own_run_record(
    refreshed: dict[str, Any], settings: Settings, pg: psycopg.Connection
) -> None:
    from flows.orchestration.daily_refresh import daily_refresh

    before = snapshot(pg)
    assert before[f"{settings.raw_schema}.search_query_performance"][0] > 0
    summary = daily_refresh(dry_run=True, force=True, trigger="test")
    after = snapshot(pg)

    runs = f"{settings.control_schema}.refresh_runs"
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [runs], changed
    assert after[runs][0] == before[runs][0] + 1

    assert summary["status"] == "success" and summary["dry_run"]
    row = pg.execute(
        sql.SQL("select status, plan from {} where run_id = %s").format(
            sql.Identifier(settings.control_schema, "refresh_runs")
        ),
        (summary["run_id"],),
    ).fetchone()
    assert row is not None and row[0] == "success"
    plan = {t["table"]: t["plan"] for t in row[1]}
    assert set(plan) == {"search_query_performance", "daily_search_terms", "products"}
    sqp = plan["search_query_performance"]
    # Rows: exact per slice (a count over the cursor column). Bytes: BigQuery's dry-run estimate,
    # which the emulator reports as 0.
    assert all(isinstance(p["estimated_bytes"], int) and p["estimated_bytes"] >= 0 for p in sqp)
    counts = pg.execute(
        sql.SQL("select count(*) from {} where date >= %s::timestamptz and date < %s::timestamptz").format(
            sql.Identifier(settings.raw_schema, "search_query_performance")
        ),
        [f"{d} 00:00+00" for d in sqp[0]["slice"].split("..")],
    ).fetchone()
    assert counts is not None and sqp[0]["estimated_rows"] == counts[0]
    assert sum(p["estimated_rows"] for p in sqp) > 0
    assert plan["products"] == [
        {"slice": "full", "estimated_rows": 20, "estimated_bytes": plan["products"][0]["estimated_bytes"]}
    ]
