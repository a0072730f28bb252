"""The steps of a refresh run as plain functions: validate, plan, begin, build, summarise, finish.

The Prefect flow in flows/orchestration/daily_refresh.py strings them together; tests call them directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import yaml

from flows.control import dbt_audit, registry, runs
from flows.control.dbt_audit import DbtOutcome, NodeRun, NodeStatus
from flows.control.runs import RunStatus
from flows.control.tables import TableOutcome, TableStatus
from flows.core.db import connect, migrate
from flows.core.errors import ConfigError
from flows.core.identifiers import validate_pg_identifier
from flows.core.planning import RefreshSchedule, is_due, next_due
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig, load_file
from flows.engine import transform, validation
from flows.engine.bigquery import BigQueryClients
from flows.engine.extract import list_source_tables
from flows.engine.periods import changed_days
from flows.engine.table_refresh import RefreshOptions
from flows.engine.validation import AfterRefresh
from flows.notify import webhooks

DBT_SOURCE = "sqp"
CONTROL_SOURCE = "refresh_control"
MAX_TRIGGER_LENGTH = 40
SCHEDULE_TRIGGER = "schedule"


@dataclass(frozen=True)
class RunParams:
    """The flow's parameters after validation (what the audit row records)."""

    tables: list[str] | None = None
    start_date: date | None = None
    end_date: date | None = None
    full_refresh: bool = False
    dry_run: bool = False
    force: bool = False
    trigger: str = "manual"

    @property
    def scheduled(self) -> bool:
        """Started by the deployment's schedule (which sets trigger `schedule`): it sets the cadence."""
        return self.trigger == SCHEDULE_TRIGGER

    @property
    def options(self) -> RefreshOptions:
        return RefreshOptions(self.start_date, self.end_date, self.full_refresh, self.dry_run)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def validate_params(
    tables: list[str] | None = None,
    start_date: date | None = None,
    end_date: date | None = None,
    full_refresh: bool = False,
    dry_run: bool = False,
    force: bool = False,
    trigger: str = "manual",
    *,
    today: date | None = None,
) -> RunParams:
    """Check the parameters before anything is touched; every problem says what to change.

    Types (dates, booleans, a list of names) are already checked by Prefect from the flow's
    signature, for runs started from the UI or the API too; these are the rules between them.
    """
    today = today or datetime.now(UTC).date()
    # A day of slack: a caller east of UTC may already be on tomorrow's date.
    latest = today + timedelta(days=1)
    problems = []
    if start_date and end_date and start_date > end_date:
        problems.append(f"start_date {start_date} is after end_date {end_date}")
    for name, value in (("start_date", start_date), ("end_date", end_date)):
        if value and value > latest:
            problems.append(f"{name} {value} is in the future (today is {today} UTC)")
    if full_refresh and (start_date or end_date):
        problems.append("full_refresh reloads whole tables: leave start_date/end_date empty, or drop it")
    names: list[str] = []
    for raw in tables or []:
        name = raw.strip()
        if not name:
            continue
        try:
            names.append(validate_pg_identifier(name, "table name"))
        except ConfigError as exc:
            problems.append(str(exc))
    trigger = trigger.strip()
    if not trigger or len(trigger) > MAX_TRIGGER_LENGTH:
        problems.append(f"trigger must be 1-{MAX_TRIGGER_LENGTH} characters")
    if problems:
        raise ConfigError("invalid run parameters: " + "; ".join(problems))
    return RunParams(
        tables=list(dict.fromkeys(names)) or None,
        start_date=start_date,
        end_date=end_date,
        full_refresh=full_refresh,
        dry_run=dry_run,
        force=force,
        trigger=trigger,
    )


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


def begin_run(
    lock_conn: psycopg.Connection,
    settings: Settings,
    *,
    flow_run_id: UUID | None,
    params: RunParams,
) -> runs.RunRecord:
    with lock_conn.transaction():  # a killed run's refresh.failed event commits with its row
        runs.mark_abandoned(lock_conn, settings.control_schema)
        webhooks.runs_abandoned(lock_conn, settings)
    return runs.start_run(
        lock_conn,
        settings.control_schema,
        flow_run_id=flow_run_id,
        trigger=params.trigger,
        params=params.to_json(),
    )


def dbt_sources(project_dir: Path) -> set[str]:
    """Tables of the dbt source `sqp` (the raw tables dbt models read), from the model YAML."""
    names: set[str] = set()
    for path in sorted((project_dir / "models").rglob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for source in doc.get("sources") or []:
            if source.get("name") == DBT_SOURCE:
                names.update(t["name"] for t in source.get("tables") or [])
    return names


def dbt_build_args(
    outcomes: list[TableOutcome], full_refresh: bool, sources: set[str], explicit_range: bool = False
) -> list[str] | None:
    """`dbt build` of what is downstream of the live dbt sources this run changed (None: nothing).

    A table changed when it applied a slice or owes one a rebuild (TableOutcome.changed_slices),
    or was replaced whole, now or by a run whose dbt build did not succeed
    (TableOutcome.replaced_whole); a table found unchanged changes nothing. Tables without a
    dbt source (registered later, not modelled yet) change no model. The incremental models
    rebuild:
    - a daily run: the periods of the changed days only (var refresh_days, flows.engine.periods);
    - a requested date range (backfill): everything from its start (var refresh_start_date);
    - --full-refresh: everything.
    Only a full_replace table changed: no var, the models' lookback from their watermark. The raw
    schema the run loaded into is added to the vars by flows.engine.transform.run_dbt.
    """
    changed = [
        o
        for o in outcomes
        if o.changed_live_data and o.table_name in sources and (o.changed_slices or o.replaced_whole)
    ]
    if not changed:
        return None
    # The monitoring views over the control schema (models/monitoring) are rebuilt too: views,
    # so this costs little, and a new column of theirs is live after the next refresh.
    select = " ".join(
        [*(f"source:{DBT_SOURCE}.{o.table_name}+" for o in changed), f"source:{CONTROL_SOURCE}+"]
    )
    dbt_vars = {} if full_refresh else rebuild_vars(changed, explicit_range)
    args = ["build", "--select", select, "--vars", json.dumps(dbt_vars)]
    if full_refresh:
        args.append("--full-refresh")
    return args


def rebuild_vars(changed: list[TableOutcome], explicit_range: bool) -> dict[str, Any]:
    """The dbt vars saying which periods the incremental models rebuild (see dbt_build_args)."""
    if explicit_range:
        starts = [o.window.first for o in changed if o.window is not None]
        return {"refresh_start_date": min(starts).isoformat()} if starts else {}
    slices = [s for o in changed for s in o.changed_slices]
    if not slices:
        return {}
    days: set[date] = set()
    for o in changed:
        days.update(changed_days(o.changed_slices, o.slice_days))
    return {"refresh_days": [d.isoformat() for d in sorted(days)]}


@dataclass
class RunSummary:
    run_id: str
    status: RunStatus
    message: str
    tables: list[dict[str, Any]] = field(default_factory=list)
    dbt_models_built: int = 0
    dbt_nodes: int = 0
    dbt_failed: list[str] = field(default_factory=list)
    # Nodes dbt skipped because something upstream of them failed: stale in Postgres.
    dbt_skipped: list[str] = field(default_factory=list)
    first_error: str | None = None
    dbt_invocation_id: str | None = None
    dry_run: bool = False
    flow_run_id: str | None = None
    duration_s: float = 0.0
    # The after-refresh validation of each live table (flows.engine.validation.AfterRefresh.to_dict).
    validation: list[dict[str, Any]] = field(default_factory=list)
    # The shadow build and its comparison with live (None: no shadow table loaded).
    shadow: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# At most this many node names in a run's message (the summary and the audit keep them all).
MAX_NAMES_IN_MESSAGE = 10


def _names(nodes: list[NodeRun]) -> str:
    names = [n["name"] for n in nodes[:MAX_NAMES_IN_MESSAGE]]
    more = len(nodes) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _first_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else None


def skipped_nodes(dbt: DbtOutcome) -> list[NodeRun]:
    return [n for n in dbt.nodes if n["status"] == NodeStatus.SKIPPED]


def first_error(outcomes: list[TableOutcome], dbt: DbtOutcome | None) -> str | None:
    """The first line of the first failed dbt node's error, else dbt's own, else a table's."""
    if dbt is not None and not dbt.success:
        for n in dbt.failed_nodes:
            if line := _first_line(n["message"]):
                return f"{n['name']}: {line}"
        if line := _first_line(dbt.message):
            return line
    for o in outcomes:
        if o.status == TableStatus.FAILED and (line := _first_line(o.error)):
            return f"{o.table_name}: {line}"
    return None


def dbt_problem(dbt: DbtOutcome) -> str:
    """Which dbt nodes failed and which were skipped because of them, and the first error."""
    failed, skipped = dbt.failed_nodes, skipped_nodes(dbt)
    parts = []
    if failed:
        parts.append(f"{len(failed)} failed ({_names(failed)})")
    if skipped:
        parts.append(f"{len(skipped)} skipped, stale until the next build ({_names(skipped)})")
    error = first_error([], dbt)
    return "dbt: " + ("; ".join(parts) or "failed") + (f"; first error: {error}" if error else "")


def overall_status(outcomes: list[TableOutcome], dbt: DbtOutcome | None) -> tuple[RunStatus, str]:
    """success, warning (something failed, the rest went on) or failed, and why: the failed
    tables, the failed and skipped dbt nodes and the first error line."""
    failed = [o for o in outcomes if o.status == TableStatus.FAILED]
    problems = [f"{o.table_name}: {o.error}" for o in failed]
    if dbt is not None and not dbt.success:
        problems.append(dbt_problem(dbt))
    if outcomes and len(failed) == len(outcomes):
        return RunStatus.FAILED, "every table failed: " + " | ".join(problems)
    if dbt is not None and dbt.invocation_id is None and not dbt.success:
        return RunStatus.FAILED, " | ".join(problems)
    if problems:
        ok = len(outcomes) - len(failed)
        return RunStatus.WARNING, f"{ok} of {len(outcomes)} table(s) refreshed; " + " | ".join(problems)
    if not outcomes:
        return RunStatus.SUCCESS, "no table was due"
    if all(o.status == TableStatus.PLANNED for o in outcomes):
        return RunStatus.SUCCESS, f"dry run: {len(outcomes)} table(s) planned, nothing written"
    return RunStatus.SUCCESS, f"{len(outcomes)} table(s) refreshed"


def validate_after_refresh(
    settings: Settings,
    clients: BigQueryClients,
    chosen: list[TableConfig],
    outcomes: list[TableOutcome],
    run_id: UUID,
    dry_run: bool,
) -> list[AfterRefresh]:
    """The run's validation step: each live table's committed periods against BigQuery (for
    the periods its change detection fingerprinted, that fingerprint)."""
    by_name = {o.table_name: o for o in outcomes}
    return [
        validation.validate_touched(
            settings,
            clients,
            c,
            o.status if (o := by_name.get(c.table_name)) else TableStatus.SKIPPED,
            run_id,
            dry_run,
            o.plan_fingerprints if o else None,
        )
        for c in chosen
    ]


def with_validation(status: RunStatus, message: str, checks: list[AfterRefresh]) -> tuple[RunStatus, str]:
    """A period that differs from BigQuery (or a validation that could not run) makes a
    successful run a `warning` naming the table and period; a failed run stays failed."""
    problems = [f"{v.table_name} differs from BigQuery in {', '.join(v.failed)}" for v in checks if v.failed]
    problems += [f"{v.table_name}: validation could not run: {v.error}" for v in checks if v.error]
    if not problems:
        return status, message
    note = "validation: " + " | ".join(problems) + " (`refresh validate-data` shows the rows)"
    return (RunStatus.WARNING if status == RunStatus.SUCCESS else status), f"{message} | {note}"


def shadow_step(
    settings: Settings, outcomes: list[TableOutcome], run_id: UUID, full_refresh: bool
) -> dict[str, Any] | None:
    """When shadow tables loaded: dbt builds every model from the shadow raw schema into the
    `*_shadow` schemas, then each mart and summary is compared with live, period by period,
    and recorded (dq_results `shadow_match`, `validation.failed` per model that differs).
    Readers never see shadow data, so the run's status is left as it is."""
    sources = dbt_sources(settings.dbt_project_dir)
    loaded = [
        o
        for o in outcomes
        if o.status == TableStatus.SUCCESS
        and o.mode == Mode.SHADOW.value
        and o.slices_done
        and o.table_name in sources
    ]
    if not loaded:
        return None
    starts = [o.window.first for o in loaded if o.window is not None]
    start = None if full_refresh or not starts else min(starts).isoformat()
    args = transform.shadow_build_args(settings, start) + (["--full-refresh"] if full_refresh else [])
    began = datetime.now(UTC)
    out: dict[str, Any] = {"tables": [o.table_name for o in loaded], "error": None}
    with connect(settings, autocommit=True) as conn:
        try:
            # Compared while the stand-ins exist: views over them (asin_performance) go with them.
            with transform.live_stand_ins(conn, settings, sources):
                dbt = transform.run_dbt(settings, args)
                results = validation.compare_shadow(conn, transform.SHADOW_SUFFIX)
            dbt_audit.record_dbt(conn, settings.control_schema, dbt, run_id, None, began, datetime.now(UTC))
            validation.record_shadow(conn, settings.control_schema, results, run_id)
        except psycopg.OperationalError:
            raise  # Postgres lost: the run's own handling applies
        except psycopg.Error as exc:
            # A shadow problem never fails the live run; it is named in its message.
            return {
                **out,
                "dbt_success": False,
                "dbt_failed": [],
                "periods_compared": 0,
                "differs": [],
                "error": error_text(exc),
            }
    return {
        **out,
        "dbt_success": dbt.success,
        "dbt_failed": [n["unique_id"] for n in dbt.failed_nodes],
        "periods_compared": len(results),
        "differs": [f"{r.model} {r.period_start or 'full'}" for r in results if not r.passed],
    }


def with_shadow(message: str, shadow: dict[str, Any] | None) -> str:
    if not shadow or (shadow["dbt_success"] and not shadow["differs"]):
        return message
    notes = []
    if shadow.get("error"):
        notes.append(f"shadow comparison could not run: {shadow['error']}")
    elif not shadow["dbt_success"]:
        notes.append(
            f"shadow dbt build failed ({', '.join(shadow['dbt_failed'][:5]) or 'see dbt_invocations'})"
        )
    if shadow["differs"]:
        shown = shadow["differs"][:MAX_NAMES_IN_MESSAGE]
        more = len(shadow["differs"]) - len(shown)
        notes.append(
            "shadow differs from live in " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        )
    return f"{message} | " + "; ".join(notes)


def summarise(
    run_id: UUID,
    outcomes: list[TableOutcome],
    dbt: DbtOutcome | None,
    dry_run: bool,
    *,
    flow_run_id: UUID | None = None,
    duration_s: float = 0.0,
    validation: list[AfterRefresh] | None = None,
    shadow: dict[str, Any] | None = None,
) -> RunSummary:
    status, message = overall_status(outcomes, dbt)
    status, message = with_validation(status, message, validation or [])
    return RunSummary(
        shadow=shadow,
        message=with_shadow(message, shadow),
        validation=[v.to_dict() for v in validation or []],
        run_id=str(run_id),
        status=status,
        dry_run=dry_run,
        flow_run_id=str(flow_run_id) if flow_run_id else None,
        duration_s=round(duration_s, 2),
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
        dbt_skipped=[n["unique_id"] for n in skipped_nodes(dbt)] if dbt else [],
        first_error=first_error(outcomes, dbt),
        dbt_invocation_id=dbt.invocation_id if dbt else None,
    )


def finish_run(
    conn: psycopg.Connection, settings: Settings, run: runs.RunRecord, summary: RunSummary
) -> None:
    ok = sum(1 for t in summary.tables if t["status"] in ("success", "planned"))
    # The webhook event commits with the run row or not at all (transactional outbox).
    with conn.transaction():
        runs.finish_run(
            conn,
            settings.control_schema,
            run.run_id,
            status=runs.RunStatus(summary.status),
            message=summary.message,
            tables_planned=len(summary.tables),
            tables_succeeded=ok,
            tables_failed=len(summary.tables) - ok,
            rows_read=sum(t["rows_read"] for t in summary.tables),
            rows_inserted=sum(t["rows_inserted"] for t in summary.tables),
            dbt_invocation_id=summary.dbt_invocation_id,
        )
        webhooks.run_finished(conn, settings, summary)
    if summary.dry_run:
        runs.set_plan(conn, settings.control_schema, run.run_id, summary.tables)


MAX_PLAN_LINES = 12


def markdown_report(summary: RunSummary, settings: Settings) -> str:
    """The run's Prefect artifact: status and why, per table, dbt, and where to look next."""
    docs = Path(settings.dbt_project_dir) / "target" / "index.html"
    dashboard = settings.dashboard_url or f"http://{settings.api_host}:{settings.api_port}/"
    lines = [
        f"# Refresh {summary.status.upper()}{' (dry run)' if summary.dry_run else ''}",
        "",
        summary.message,
        "",
        f"{len(summary.tables)} table(s), {sum(t['slices'] for t in summary.tables)} slice(s), "
        f"{sum(t['rows_inserted'] for t in summary.tables)} rows inserted in {summary.duration_s}s.",
        "",
        "| table | status | mode | window | slices | skipped | rows read | rows inserted "
        "| rows deleted | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary.tables:
        lines.append(
            f"| {t['table']} | {t['status']} | {t['mode']} | {t['window'] or '-'} | {t['slices']} | "
            f"{t['slices_skipped']} | {t['rows_read']} | {t['rows_inserted']} | {t['rows_deleted']} | "
            f"{t['duration_s']} |"
        )
    errors = [t for t in summary.tables if t["error"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- **{t['table']}**: {t['error']}" for t in errors]
    planned = [t for t in summary.tables if t["plan"]]
    if planned:
        lines += ["", "## Plan (rows and estimated bytes per slice)", ""]
        for t in planned:
            shown = t["plan"][:MAX_PLAN_LINES]
            more = len(t["plan"]) - len(shown)
            lines.append(
                f"- **{t['table']}**: "
                + ", ".join(
                    f"{p['slice']} {p.get('estimated_rows', '?')} rows ~{p['estimated_bytes']} B"
                    for p in shown
                )
                + (f", and {more} more" if more > 0 else "")
            )
    checked = [v for v in summary.validation if not v["skipped"]]
    if checked:
        lines += ["", "## Validation against BigQuery (the periods this run loaded)", ""]
        lines += [
            f"- **{v['table']}**: {v['periods']} period(s), "
            + (f"differ: {', '.join(v['failed'])}" if v["failed"] else (v["error"] or "all equal"))
            + f" ({v['duration_s']}s, {v['bytes_processed']} B)"
            for v in checked
        ]
    if summary.shadow:
        sh = summary.shadow
        lines += [
            "",
            "## Shadow",
            "",
            f"{', '.join(sh['tables'])}: shadow dbt build {'ok' if sh['dbt_success'] else 'failed'}; "
            f"{sh['periods_compared']} model period(s) compared with live, "
            + (f"differ: {', '.join(sh['differs'][:MAX_PLAN_LINES])}" if sh["differs"] else "all equal"),
        ]
    lines += [
        "",
        "## dbt",
        "",
        f"{summary.dbt_models_built} models built, {summary.dbt_nodes} nodes, "
        f"{len(summary.dbt_failed)} failed, {len(summary.dbt_skipped)} skipped "
        f"(invocation `{summary.dbt_invocation_id or 'none'}`).",
        "",
    ]
    if summary.dbt_failed:
        lines += ["Failed: " + ", ".join(f"`{u}`" for u in summary.dbt_failed), ""]
    if summary.dbt_skipped:
        lines += [
            "Skipped because something upstream failed (stale until the next build): "
            + ", ".join(f"`{u}`" for u in summary.dbt_skipped),
            "",
        ]
    if summary.first_error:
        lines += [f"First error: {summary.first_error}", ""]
    lines += [
        f"dbt docs (lineage from the BigQuery sources to the summaries): `refresh docs` writes and "
        f"serves `{docs}`.",
        "",
        "## Audit",
        "",
        f"Run `{summary.run_id}`, flow run `{summary.flow_run_id or '-'}`: `refresh history` lists it; "
        f"its rows in `{settings.control_schema}` (table_refreshes, slice_refreshes, dbt_invocations) "
        "carry the run id.",
        f"Dashboard: [{dashboard}]({dashboard}) (`refresh api` serves it).",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')}.",
    ]
    return "\n".join(lines)
