"""The steps of a refresh run as plain functions: prepare, plan, begin, finish, summarise.

The Prefect flow in flows/daily_refresh.py strings them together; tests call them directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from flows import audit, registry
from flows.bigquery import BigQueryClients
from flows.db import connect, migrate
from flows.errors import ConfigError
from flows.extract import list_source_tables
from flows.refresh import TableOutcome
from flows.registry import Mode, TableConfig
from flows.settings import Settings
from flows.transform import DbtOutcome

DBT_SOURCE = "sqp"


def prepare(settings: Settings, clients: BigQueryClients | None, *, register_new: bool) -> list[TableConfig]:
    """Migrate the control schema, sync the registry file, register new source tables."""
    migrate(settings)
    file_configs = registry.load_file(settings.tables_file)
    with connect(settings) as conn:
        with conn.transaction():
            registry.sync_from_file(conn, settings.control_schema, file_configs)
        configs = registry.load_all(conn, settings.control_schema)
        if register_new and clients is not None:
            with conn.transaction():
                added = registry.register_new_tables(
                    conn, settings.control_schema, list_source_tables(clients), configs
                )
            if added:
                configs = registry.load_all(conn, settings.control_schema)
    return configs


def select_tables(
    configs: list[TableConfig], requested: list[str] | None, *, force: bool, now: datetime
) -> list[TableConfig]:
    """Tables to refresh, highest priority first: the requested ones, or the enabled due ones."""
    by_name = {c.table_name: c for c in configs}
    if requested:
        unknown = [t for t in requested if t not in by_name]
        if unknown:
            raise ConfigError(
                f"unknown table(s) {', '.join(unknown)}; registered: {', '.join(sorted(by_name))}"
            )
        chosen = [by_name[t] for t in dict.fromkeys(requested)]
        disabled = [c.table_name for c in chosen if not c.enabled or c.mode is Mode.DISABLED]
        if disabled and not force:
            raise ConfigError(f"table(s) {', '.join(disabled)} are disabled: enable them or pass --force")
    else:
        chosen = [
            c
            for c in configs
            if c.enabled
            and c.mode is not Mode.DISABLED
            and (force or c.next_refresh_at is None or c.next_refresh_at <= now)
        ]
    return sorted(chosen, key=lambda c: (-c.priority, c.table_name))


def validate_params(start_date: date | None, end_date: date | None) -> None:
    if start_date and end_date and start_date > end_date:
        raise ConfigError(f"start_date {start_date} is after end_date {end_date}")


def begin_run(
    lock_conn: psycopg.Connection,
    settings: Settings,
    *,
    flow_run_id: UUID | None,
    trigger: str,
    params: dict[str, Any],
) -> audit.RunRecord:
    audit.mark_abandoned(lock_conn, settings.control_schema)
    return audit.start_run(
        lock_conn, settings.control_schema, flow_run_id=flow_run_id, trigger=trigger, params=params
    )


def dbt_build_args(outcomes: list[TableOutcome], full_refresh: bool) -> list[str] | None:
    """`dbt build` of what is downstream of the live tables this run changed (None: nothing)."""
    changed = [o for o in outcomes if o.changed_live_data]
    if not changed:
        return None
    select = " ".join(f"source:{DBT_SOURCE}.{o.table_name}+" for o in changed)
    starts = [o.window.first for o in changed if o.window is not None]
    dbt_vars: dict[str, str] = {}
    if starts and not full_refresh:
        dbt_vars["refresh_start_date"] = min(starts).isoformat()
    args = ["build", "--select", select, "--vars", json.dumps(dbt_vars)]
    if full_refresh:
        args.append("--full-refresh")
    return args


@dataclass
class RunSummary:
    run_id: str
    status: str
    message: str
    tables: list[dict[str, Any]] = field(default_factory=list)
    dbt_models_built: int = 0
    dbt_nodes: int = 0
    dbt_failed: list[str] = field(default_factory=list)
    dbt_invocation_id: str | None = None
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def overall_status(outcomes: list[TableOutcome], dbt: DbtOutcome | None) -> tuple[str, str]:
    failed = [o for o in outcomes if o.status == "failed"]
    problems = [f"{o.table_name}: {o.error}" for o in failed]
    if dbt is not None and not dbt.success:
        problems.append(dbt.message or "dbt failed")
    if outcomes and len(failed) == len(outcomes):
        return "failed", "every table failed: " + " | ".join(problems)
    if dbt is not None and dbt.invocation_id is None and not dbt.success:
        return "failed", " | ".join(problems)
    if problems:
        return "warning", " | ".join(problems)
    if not outcomes:
        return "success", "no table was due"
    return "success", f"{len(outcomes)} table(s) refreshed"


def summarise(
    run_id: UUID, outcomes: list[TableOutcome], dbt: DbtOutcome | None, dry_run: bool
) -> RunSummary:
    status, message = overall_status(outcomes, dbt)
    return RunSummary(
        run_id=str(run_id),
        status=status,
        message=message,
        dry_run=dry_run,
        tables=[
            {
                "table": o.table_name,
                "status": o.status,
                "mode": o.mode,
                "rows_read": o.rows_read,
                "rows_inserted": o.rows_inserted,
                "rows_deleted": o.rows_deleted,
                "slices": o.slices_done,
                "slices_skipped": o.slices_skipped,
                "duration_s": round(o.duration_s, 2),
                "window": None if o.window is None else f"{o.window.first}..{o.window.last}",
                "error": o.error,
                "plan": o.plan,
            }
            for o in outcomes
        ],
        dbt_models_built=dbt.models_built if dbt else 0,
        dbt_nodes=len(dbt.nodes) if dbt else 0,
        dbt_failed=[n["unique_id"] for n in dbt.failed_nodes] if dbt else [],
        dbt_invocation_id=dbt.invocation_id if dbt else None,
    )


def finish_run(
    conn: psycopg.Connection, settings: Settings, run: audit.RunRecord, summary: RunSummary
) -> None:
    ok = sum(1 for t in summary.tables if t["status"] in ("success", "planned"))
    audit.finish_run(
        conn,
        settings.control_schema,
        run.run_id,
        status=summary.status,
        message=summary.message,
        tables_planned=len(summary.tables),
        tables_succeeded=ok,
        tables_failed=len(summary.tables) - ok,
        rows_read=sum(t["rows_read"] for t in summary.tables),
        rows_inserted=sum(t["rows_inserted"] for t in summary.tables),
        dbt_invocation_id=summary.dbt_invocation_id,
    )
    if summary.dry_run:
        conn.execute(
            sql.SQL("update {} set plan = %s where run_id = %s").format(
                sql.Identifier(settings.control_schema, "refresh_runs")
            ),
            (json.dumps(summary.tables, default=str), run.run_id),
        )


def markdown_report(summary: RunSummary, settings: Settings) -> str:
    lines = [
        f"# Refresh {summary.status.upper()}{' (dry run)' if summary.dry_run else ''}",
        "",
        summary.message,
        "",
        "| table | status | mode | slices | rows read | rows inserted | rows deleted | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in summary.tables:
        lines.append(
            f"| {t['table']} | {t['status']} | {t['mode']} | {t['slices']} | {t['rows_read']} | "
            f"{t['rows_inserted']} | {t['rows_deleted']} | {t['duration_s']} |"
        )
    lines += [
        "",
        f"dbt: {summary.dbt_models_built} models built, {summary.dbt_nodes} nodes, "
        f"{len(summary.dbt_failed)} failed (invocation {summary.dbt_invocation_id})",
        "",
        f"Run id `{summary.run_id}`; dbt docs: `refresh docs` "
        f"(target/index.html under {settings.dbt_project_dir}).",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')}.",
    ]
    return "\n".join(lines)
