"""Which tables a run refreshes (the plan step) and when each is next due (after the loads)."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from flows.control import registry
from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.core.db import connect, migrate
from flows.core.errors import ConfigError
from flows.core.planning import RefreshSchedule, is_due, next_due
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig, load_file
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import list_source_tables
from flows.orchestration.run_params import RunParams


def prepare(settings: Settings) -> list[TableConfig]:
    """Migrate the control schema and sync the registry file; the registry as it now stands."""
    migrate(settings)
    file_configs = load_file(settings.tables_file)
    with connect(settings) as conn:
        with conn.transaction():
            registry.sync_from_file(conn, settings.control_schema, file_configs)
        return registry.load_all(conn, settings.control_schema)


def register_new_tables(
    settings: Settings, clients: BigQueryClients, configs: list[TableConfig]
) -> list[TableConfig]:
    """Register source tables the registry has never seen; the registry with them."""
    with connect(settings) as conn:
        with conn.transaction():
            added = registry.register_new_tables(
                conn, settings.control_schema, list_source_tables(clients), configs
            )
        return registry.load_all(conn, settings.control_schema) if added else configs


def select_tables(
    configs: list[TableConfig],
    requested: list[str] | None,
    *,
    force: bool,
    now: datetime,
    scheduled: bool = False,
) -> list[TableConfig]:
    """Tables to refresh, highest priority first: the requested ones, or the enabled due ones
    (flows.core.planning.is_due at the run's anchor `now`).

    Requested tables are refreshed whether due or not; disabled ones only with `force`.
    """
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
            if c.enabled and c.mode is not Mode.DISABLED and (force or is_due(c, now, scheduled=scheduled))
        ]
    return sorted(chosen, key=lambda c: (-c.priority, c.table_name))


def plan_tables(
    settings: Settings, clients: BigQueryClients, params: RunParams, now: datetime
) -> list[TableConfig]:
    """Plan: the tables this run refreshes. Unknown or disabled tables fail here, before any write.

    `now` is the run's anchor (run_anchor). A run with no tables named, not a dry run, also
    registers new source tables; they start in dry_run mode, so they are planned but write
    nothing.
    """
    schedule(settings)  # a bad schedule fails here, before anything is written
    configs = prepare(settings)
    chosen = select_tables(configs, params.tables, force=params.force, now=now, scheduled=params.scheduled)
    if params.tables or params.dry_run:
        return chosen
    with_new = register_new_tables(settings, clients, configs)
    if len(with_new) == len(configs):
        return chosen
    return select_tables(with_new, None, force=params.force, now=now, scheduled=params.scheduled)


def run_anchor(scheduled_start: datetime | None, started: datetime) -> datetime:
    """The time a run's due times count from: its scheduled start (Prefect's expected start of
    the flow run, the cron tick for a scheduled run however late it starts), else its start."""
    return (scheduled_start or started).astimezone(UTC)


def schedule(settings: Settings) -> RefreshSchedule:
    """The schedule due times follow (ConfigError naming the setting when it is bad)."""
    return RefreshSchedule(settings.schedule_cron, settings.schedule_timezone)


def advance_due_times(
    conn: psycopg.Connection,
    settings: Settings,
    chosen: list[TableConfig],
    outcomes: list[TableOutcome],
    anchor: datetime,
    *,
    scheduled: bool,
) -> dict[str, datetime]:
    """Each table this run refreshed successfully gets its next due time (flows.core.planning.next_due);
    a failed or only planned table stays due. Returns the new due times."""
    by_name = {c.table_name: c for c in chosen}
    grid = schedule(settings)
    due = {
        o.table_name: next_due(by_name[o.table_name], anchor, scheduled=scheduled, schedule=grid)
        for o in outcomes
        if o.status == TableStatus.SUCCESS and o.table_name in by_name
    }
    for table, when in due.items():
        registry.set_next_refresh(conn, settings.control_schema, table, when)
    return due
