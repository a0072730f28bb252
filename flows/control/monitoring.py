"""What the API and the dashboard show: health, freshness, runs, metrics and trends.

The same rules as the dbt views in models/monitoring/ (freshness against the table's
frequency, success rates), computed here from the control schema directly: the API answers
right after a refresh and on a database where dbt has not built those views yet (the flow
only builds what is downstream of the tables it refreshed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from flows.control import checkpoints, history, registry
from flows.control.runs import RunStatus
from flows.control.statuses import TableStatus
from flows.core.db import qualified
from flows.core.table_config import Mode


class Freshness(StrEnum):
    FRESH = "fresh"  # last success within one refresh frequency
    AGING = "aging"  # older than 1x the frequency
    STALE = "stale"  # older than 2x the frequency
    NEVER = "never"  # no successful refresh yet


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILING = "failing"


BAD_RUN_STATUSES = (RunStatus.FAILED, RunStatus.ABANDONED)


def freshness(last_success: datetime | None, frequency_hours: int, now: datetime) -> Freshness:
    if last_success is None:
        return Freshness.NEVER
    age = now - last_success
    if age > timedelta(hours=2 * frequency_hours):
        return Freshness.STALE
    if age > timedelta(hours=frequency_hours):
        return Freshness.AGING
    return Freshness.FRESH


def health(tables: list[dict[str, Any]], runs: list[dict[str, Any]]) -> tuple[Health, list[str]]:
    """The overall state and the reasons for it.

    Only monitored tables count (enabled, mode live or shadow: dry_run and disabled tables
    write nothing, so they cannot be late). `runs` are the window's runs, newest first.
    - failing: a monitored table is stale (> 2x its frequency) or never succeeded, or the
      latest finished run failed or was abandoned;
    - degraded: a monitored table is aging (> 1x), its latest refresh failed, or a run in
      the window ended failed, abandoned or with a warning;
    - healthy: everything else.
    """
    failing: list[str] = []
    degraded: list[str] = []
    for t in tables:
        if not t["monitored"]:
            continue
        name = t["table"]
        if t["freshness"] in (Freshness.STALE, Freshness.NEVER):
            failing.append(f"{name} is {t['freshness']}")
        elif t["freshness"] == Freshness.AGING:
            degraded.append(f"{name} is aging")
        if t["last_status"] == TableStatus.FAILED:
            degraded.append(f"{name}: latest refresh failed")
    finished = [r for r in runs if r["status"] != RunStatus.RUNNING]
    if finished and finished[0]["status"] in BAD_RUN_STATUSES:
        failing.append(f"latest run {finished[0]['run_id']} {finished[0]['status']}")
    bad = [r for r in finished[1:] if r["status"] in (*BAD_RUN_STATUSES, RunStatus.WARNING)]
    bad += [r for r in finished[:1] if r["status"] == RunStatus.WARNING]
    if bad:
        degraded.append(f"{len(bad)} run(s) in the window failed or ended with a warning")
    if failing:
        return Health.FAILING, failing + degraded
    if degraded:
        return Health.DEGRADED, degraded
    return Health.HEALTHY, []


def _rows(
    conn: psycopg.Connection, query: sql.Composed, params: tuple[Any, ...] = ()
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def runs_since(
    conn: psycopg.Connection, schema: str, since: datetime, limit: int = 200
) -> list[dict[str, Any]]:
    """Runs started since `since`, newest first."""
    return _rows(
        conn,
        sql.SQL(
            "select run_id, flow_run_id, status, trigger, started_at, finished_at, "
            "extract(epoch from finished_at - started_at)::float8 as duration_s, tables_planned, "
            "tables_failed, rows_inserted, message from {r} where started_at >= %s "
            "order by started_at desc limit %s"
        ).format(r=qualified(schema, "refresh_runs")),
        (since, limit),
    )


def table_overview(conn: psycopg.Connection, schema: str, now: datetime) -> list[dict[str, Any]]:
    """Per registered table: mode, last status, last success, freshness, next due."""
    configs = {c.table_name: c for c in registry.load_all(conn, schema)}
    out = []
    for row in history.table_status(conn, schema):
        cfg = configs.get(row["table_name"])
        if cfg is None:
            continue
        mode = cfg.mode.value if cfg.enabled else Mode.DISABLED.value
        out.append(
            {
                "table": cfg.table_name,
                "mode": mode,
                "monitored": cfg.enabled and cfg.mode in (Mode.LIVE, Mode.SHADOW),
                "priority": cfg.priority,
                "refresh_frequency_hours": cfg.refresh_frequency_hours,
                "last_status": row["last_status"],
                "last_started_at": row["last_started_at"],
                "last_error": row["last_error"],
                "last_success_at": row["last_success_at"],
                "last_success_rows": row["last_success_rows"],
                "freshness": freshness(row["last_success_at"], cfg.refresh_frequency_hours, now).value,
                "next_due_at": row["next_refresh_at"],
            }
        )
    return out


def run_detail(conn: psycopg.Connection, schema: str, run_id: UUID) -> dict[str, Any] | None:
    """One run (by its id or its Prefect flow run id): its tables, slices and dbt nodes."""
    runs = _rows(
        conn,
        sql.SQL(
            "select run_id, flow_run_id, status, trigger, params, plan, started_at, finished_at, "
            "heartbeat_at, extract(epoch from finished_at - started_at)::float8 as duration_s, "
            "tables_planned, tables_succeeded, tables_failed, rows_read, rows_inserted, "
            "dbt_invocation_id, message from {r} where run_id = %s or flow_run_id = %s "
            "order by started_at desc limit 1"
        ).format(r=qualified(schema, "refresh_runs")),
        (run_id, run_id),
    )
    if not runs:
        return None
    run = runs[0]
    rid = run["run_id"]
    run["tables"] = _rows(
        conn,
        sql.SQL(
            "select table_name, mode, status, write_strategy, window_start, window_end, slices_planned, "
            "slices_done, slices_skipped, rows_read, rows_inserted, rows_deleted, bytes_read, "
            "rows_per_second::float8 as rows_per_second, started_at, finished_at, "
            "extract(epoch from finished_at - started_at)::float8 as duration_s, error "
            "from {t} where run_id = %s order by started_at, table_name"
        ).format(t=qualified(schema, "table_refreshes")),
        (rid,),
    )
    run["slices"] = _rows(
        conn,
        sql.SQL(
            "select table_name, {start} as slice_start, {end} as slice_end, status, rows_read, "
            "rows_inserted, rows_deleted, bytes_read, started_at, finished_at, error from {s} "
            "where run_id = %s order by table_name, 2 nulls first"
        ).format(
            start=checkpoints.bound(sql.Identifier("slice_start")),
            end=checkpoints.bound(sql.Identifier("slice_end")),
            s=qualified(schema, "slice_refreshes"),
        ),
        (rid,),
    )
    run["dbt_nodes"] = _rows(
        conn,
        sql.SQL(
            "select n.invocation_id, n.unique_id, n.resource_type, n.name, n.relation, n.status, "
            "n.started_at, n.finished_at, n.execution_time_s, n.rows_affected, n.failures, n.message "
            "from {n} n join {i} i using (invocation_id) where i.run_id = %s "
            "order by n.started_at nulls last, n.unique_id"
        ).format(n=qualified(schema, "dbt_node_runs"), i=qualified(schema, "dbt_invocations")),
        (rid,),
    )
    return run


def metrics(conn: psycopg.Connection, schema: str, since: datetime) -> dict[str, Any]:
    """Success rate, p50/p95 duration and rows/s since `since`, per run, table and dbt model.

    Dry-run plans and skipped tables are not refreshes: they count in no rate.
    """
    runs = _rows(
        conn,
        sql.SQL(
            "select count(*) as runs, count(*) filter (where status = 'success') as succeeded, "
            "count(*) filter (where status = 'warning') as warnings, "
            "count(*) filter (where status in ('failed', 'abandoned')) as failed, "
            "percentile_cont(0.5) within group (order by extract(epoch from finished_at - started_at)) "
            "as p50_duration_s, "
            "percentile_cont(0.95) within group (order by extract(epoch from finished_at - started_at)) "
            "as p95_duration_s from {r} where started_at >= %s and status <> 'running'"
        ).format(r=qualified(schema, "refresh_runs")),
        (since,),
    )[0]
    runs["success_rate"] = round(runs["succeeded"] / runs["runs"], 4) if runs["runs"] else None
    tables = _rows(
        conn,
        sql.SQL(
            "select table_name as table, count(*) as refreshes, "
            "count(*) filter (where status = 'success') as succeeded, "
            "round(count(*) filter (where status = 'success')::numeric / count(*), 4)::float8 "
            "as success_rate, "
            "percentile_cont(0.5) within group (order by extract(epoch from finished_at - started_at)) "
            "as p50_duration_s, "
            "percentile_cont(0.95) within group (order by extract(epoch from finished_at - started_at)) "
            "as p95_duration_s, sum(rows_read) as rows_read, "
            "round(sum(rows_read) / nullif(sum(extract(epoch from finished_at - started_at)) "
            "filter (where status = 'success'), 0), 1)::float8 as rows_per_second "
            "from {t} where started_at >= %s and status in ('success', 'failed') "
            "group by table_name order by table_name"
        ).format(t=qualified(schema, "table_refreshes")),
        (since,),
    )
    models = _rows(
        conn,
        sql.SQL(
            "select n.name as model, count(*) as builds, "
            "count(*) filter (where n.status = 'success') as succeeded, "
            "round(count(*) filter (where n.status = 'success')::numeric / count(*), 4)::float8 "
            "as success_rate, "
            "percentile_cont(0.5) within group (order by n.execution_time_s) as p50_duration_s, "
            "percentile_cont(0.95) within group (order by n.execution_time_s) as p95_duration_s, "
            "round((sum(n.rows_affected) / nullif(sum(n.execution_time_s), 0))::numeric, 1)::float8 "
            "as rows_per_second from {n} n join {i} i using (invocation_id) "
            "where i.started_at >= %s and n.resource_type = 'model' group by n.name order by n.name"
        ).format(n=qualified(schema, "dbt_node_runs"), i=qualified(schema, "dbt_invocations")),
        (since,),
    )
    return {"runs": runs, "tables": tables, "dbt_models": models}


def duration_trends(
    conn: psycopg.Connection, schema: str, since: datetime
) -> dict[str, list[dict[str, Any]]]:
    """Successful refresh durations per table and dbt model build times, oldest first."""
    tables = _rows(
        conn,
        sql.SQL(
            "select table_name as name, started_at, "
            "extract(epoch from finished_at - started_at)::float8 as duration_s, "
            "rows_per_second::float8 as rows_per_second from {t} "
            "where started_at >= %s and status = 'success' order by started_at"
        ).format(t=qualified(schema, "table_refreshes")),
        (since,),
    )
    models = _rows(
        conn,
        sql.SQL(
            "select n.name, coalesce(n.started_at, i.started_at) as started_at, "
            "n.execution_time_s as duration_s from {n} n join {i} i using (invocation_id) "
            "where i.started_at >= %s and n.resource_type = 'model' and n.status = 'success' "
            "order by 2"
        ).format(n=qualified(schema, "dbt_node_runs"), i=qualified(schema, "dbt_invocations")),
        (since,),
    )
    return {"tables": tables, "dbt_models": models}


def failures(conn: psycopg.Connection, schema: str, since: datetime, limit: int = 50) -> list[dict[str, Any]]:
    """Failed runs, table refreshes and dbt nodes since `since`, newest first, with their error."""
    return _rows(
        conn,
        sql.SQL(
            "select * from ("
            " select 'run' as kind, run_id, null as name, status, started_at, message as error "
            " from {r} where started_at >= %s and status in ('failed', 'abandoned', 'warning')"
            " union all"
            " select 'table', run_id, table_name, status, started_at, error from {t}"
            " where started_at >= %s and status = 'failed'"
            " union all"
            " select 'dbt ' || n.resource_type, i.run_id, n.name, n.status, "
            "   coalesce(n.started_at, i.started_at), n.message from {n} n join {i} i using (invocation_id)"
            " where i.started_at >= %s and n.status in ('error', 'fail')"
            ") f order by started_at desc limit %s"
        ).format(
            r=qualified(schema, "refresh_runs"),
            t=qualified(schema, "table_refreshes"),
            n=qualified(schema, "dbt_node_runs"),
            i=qualified(schema, "dbt_invocations"),
        ),
        (since, since, since, limit),
    )


@dataclass(frozen=True)
class LastSuccess:
    table: str
    finished_at: datetime | None


def last_successes(conn: psycopg.Connection, schema: str, tables: list[str]) -> list[LastSuccess]:
    """Each table's latest successful refresh (None: never)."""
    rows = conn.execute(
        sql.SQL(
            "select n.name, (select max(finished_at) from {t} t where t.table_name = n.name "
            "and t.status = 'success') from unnest(%s::text[]) as n(name)"
        ).format(t=qualified(schema, "table_refreshes")),
        (tables,),
    ).fetchall()
    return [LastSuccess(r[0], r[1]) for r in rows]
