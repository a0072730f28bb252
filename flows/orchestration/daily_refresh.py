"""The Prefect flow: reads like the runbook (validate -> plan -> extract -> transform -> record).

The work lives in plain functions (the steps in flows.orchestration: run_params, run_plan,
run_record, dbt_selection, post_load_checks, run_summary, run_report; flows.engine.table_refresh,
flows.engine.transform); this module only wires them into Prefect tasks so each table and the
dbt stage show up in the UI.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import psycopg
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.control import runs
from flows.control.dbt_audit import DbtOutcome, record_dbt
from flows.control.runs import RunStatus, refresh_lock
from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.core import retry
from flows.core.db import connect
from flows.core.errors import LockLostError, PostgresLostError, RefreshError, TransientError, one_line
from flows.core.redact import redact
from flows.core.settings import Settings, get_settings
from flows.core.table_config import TableConfig
from flows.engine import maintenance, scale_out
from flows.engine.bigquery import BigQueryClients, make_clients
from flows.engine.extract import check_reachable
from flows.engine.table_refresh import RefreshOptions, refresh_table
from flows.engine.transform import run_dbt
from flows.notify import webhook_delivery
from flows.orchestration import (
    dbt_selection,
    post_load_checks,
    run_params,
    run_plan,
    run_record,
    run_report,
    run_summary,
)

log = logging.getLogger(__name__)
# A table whose slices still fail transiently after their own retries is tried again later as
# a whole (retry.TABLE): its committed slices are kept and skipped. All of it within the table's
# retry budget, so a table ends at most one attempt (bounded by the BigQuery deadlines) after
# its budget, see docs/design.md.
_budgets = retry.TableBudgets()
# The refresh lock that the command line took before starting Prefect (a run refused as busy
# then starts nothing and exits at once); the flow run in that process adopts it.
_caller_lock: psycopg.Connection | None = None


class RefreshFailed(RefreshError):
    """The run ended `failed`: every table failed, or dbt could not run."""


def _retry_transient_only(_task: Any, _run: Any, state: State[Any]) -> bool:
    # Only the TransientError raised below is worth another attempt; a bug is not.
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


@task(
    name="refresh-table",
    task_run_name="refresh {cfg.table_name}",
    cache_policy=NO_CACHE,
    retries=retry.TABLE.retries,
    retry_delay_seconds=retry.TABLE.delays(),
    retry_condition_fn=_retry_transient_only,
)
def refresh_table_task(
    settings: Settings, clients: BigQueryClients, cfg: TableConfig, run_id: UUID, options: RefreshOptions
) -> TableOutcome:
    """One table; permanent failures come back in the outcome at once, transient ones retry."""
    deadline = _budgets.deadline(run_id, cfg.table_name, settings.table_retry_budget_s)
    outcome = refresh_table(settings, clients, cfg, run_id, replace(options, deadline=deadline))
    if outcome.retryable and retry.TABLE.may_retry(task_run.run_count, deadline):
        raise TransientError(f"{cfg.table_name}: {outcome.error}")
    _budgets.done(run_id, cfg.table_name)
    return outcome


def _failure_message(exc: BaseException, outcomes: list[TableOutcome]) -> str:
    """One line: what stopped the run, then each failed table's own error (table and slice)."""
    if isinstance(exc, psycopg.OperationalError):
        head = f"lost Postgres ({one_line(exc)}): start it again, then run again (the run resumes)"
    elif isinstance(exc, RefreshError):
        head = one_line(exc)
    else:
        head = f"run crashed: {exc!r}"
    failed = [f"{o.table_name}: {o.error}" for o in outcomes if o.status == TableStatus.FAILED and o.error]
    return " | ".join([head, *failed])


@contextlib.contextmanager
def lock_taken_by_caller(lock_conn: psycopg.Connection) -> Iterator[None]:
    """The next daily_refresh run in this process uses `lock_conn`'s refresh lock and closes it
    when the run ends, as it does with a lock it takes itself."""
    global _caller_lock
    _caller_lock = lock_conn
    try:
        yield
    finally:
        _caller_lock = None


@contextlib.contextmanager
def _refresh_lock(settings: Settings, trigger: str) -> Iterator[psycopg.Connection]:
    global _caller_lock
    conn, _caller_lock = _caller_lock, None
    if conn is None:
        with refresh_lock(settings, trigger=trigger) as conn:
            yield conn
        return
    try:
        yield conn
    finally:
        conn.close()


def _check_lock(settings: Settings, run_id: UUID, doing: str) -> None:
    """The fence outside slice transactions (the lock connection itself may be dead)."""
    with connect(settings, autocommit=True) as conn:
        runs.check_lock(conn, run_id, doing)


def _end_run(settings: Settings, run: runs.RunRecord, summary: runs.RunSummary) -> runs.RunSummary:
    """Record the run's end; the summary as recorded. Never raises.

    Postgres may be restarting: retried (retry.RUN_END) for REFRESH_PG_RETRY_BUDGET_S. A run
    that lost the refresh lock meanwhile ends `failed`, whatever it did.
    """

    def record() -> None:
        nonlocal summary
        with connect(settings, autocommit=True) as conn:
            try:
                runs.check_lock(conn, run.run_id, "before recording the run's end")
            except LockLostError as exc:
                if "lost the refresh lock" not in summary.message:
                    message = f"{exc} | {summary.message}"
                    summary = replace(summary, status=RunStatus.FAILED, message=message)
            run_record.finish_run(conn, settings, run, summary)

    try:
        retry.call(
            record,
            f"run {run.run_id}: recording its end",
            retry.RUN_END,
            deadline=time.monotonic() + settings.pg_retry_budget_s,
        )
    except TransientError as exc:
        log.error(
            "run %s: could not record its end, Postgres unreachable for %.0fs (%s); it shows "
            "as running (lock lost) until the next run marks it abandoned",
            run.run_id,
            settings.pg_retry_budget_s,
            one_line(exc.__cause__ or exc),
        )
    return summary


@task(name="dbt", task_run_name="dbt {command}", cache_policy=NO_CACHE)
def dbt_task(settings: Settings, args: list[str], command: str) -> State[DbtOutcome]:
    """The dbt stage as one task: dbt's warnings in its log, every node's result in its table
    artifact; a failed node makes it end `Completed` named "Warning" (the run's summary says
    what it means for the run; the flow reads the outcome either way)."""
    dbt = run_dbt(settings, args)
    create_table_artifact(
        key="dbt-nodes",
        table=dbt.node_table(),
        description=f"dbt {command}: {len(dbt.nodes)} nodes, {len(dbt.failed_nodes)} failed",
    )
    if dbt.success:
        return Completed(data=dbt)
    return Completed(name="Warning", message=(dbt.message or "dbt failed")[:500], data=dbt)


def _flow_run_id() -> UUID | None:
    ctx = get_run_context()
    return getattr(getattr(ctx, "flow_run", None), "id", None)


def _scheduled_start() -> datetime | None:
    """The flow run's expected start: the cron tick for a scheduled run, creation otherwise."""
    when = flow_run.scheduled_start_time
    return None if when is None else datetime.fromtimestamp(when.timestamp(), UTC)


def _outcome(cfg: TableConfig, future: PrefectFuture[TableOutcome]) -> TableOutcome:
    """The table's outcome; a crash of one table's task is that table's failure only."""
    try:
        return future.result()
    except Exception as exc:
        return TableOutcome(
            cfg.table_name, TableStatus.FAILED, cfg.mode.value, error=f"unexpected error: {redact(repr(exc))}"
        )


def extract(
    settings: Settings,
    clients: BigQueryClients,
    chosen: list[TableConfig],
    run_id: UUID,
    options: RefreshOptions,
) -> list[TableOutcome]:
    """Every chosen table, concurrently (bounded by the task runner); never raises.

    Their slices run on the Dask cluster that REFRESH_DASK_ADDRESS / REFRESH_SLICE_WORKERS
    name, if any (flows.engine.scale_out); the refresh lock stays with this process.
    """
    with scale_out.slice_runner(settings):
        futures = [refresh_table_task.submit(settings, clients, c, run_id, options) for c in chosen]
        return [_outcome(c, f) for c, f in zip(chosen, futures, strict=True)]


def transform(
    settings: Settings,
    outcomes: list[TableOutcome],
    run_id: UUID,
    full_refresh: bool,
    explicit_range: bool = False,
) -> DbtOutcome | None:
    """dbt build (models and their tests) of what is downstream of the changed sources."""
    sources = dbt_selection.dbt_sources(settings.dbt_project_dir)
    args = dbt_selection.dbt_build_args(outcomes, full_refresh, sources, explicit_range=explicit_range)
    if args is None:
        return None
    started = datetime.now(UTC)
    # With dbt_node_tasks PrefectDbtRunner makes a task per node itself, under the flow.
    dbt = run_dbt(settings, args) if settings.dbt_node_tasks else dbt_task(settings, args, args[0]).result()
    with connect(settings, autocommit=True) as conn:
        record_dbt(conn, settings.control_schema, dbt, run_id, _flow_run_id(), started, datetime.now(UTC))
    return dbt


# Tables are extracted concurrently, at most two at a time (one machine, two cores by default).
@flow(
    name="daily-refresh",
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]
    log_prints=True,
)
def daily_refresh(
    tables: list[str] | None = None,
    start_date: date | None = None,
    end_date: date | None = None,
    full_refresh: bool = False,
    dry_run: bool = False,
    force: bool = False,
    trigger: str = "manual",
) -> State[dict[str, Any]]:
    """Refresh the due tables (or `tables`) from BigQuery into Postgres, then build dbt.

    Prefect shows the descriptions below in the deployment's custom-run form.

    Args:
        tables: Registry table names to refresh, due or not, e.g. ["search_query_performance"]
            (`refresh config get` lists them). Empty: every enabled table that is due.
        start_date: Backfill: first cursor date to reload, YYYY-MM-DD (e.g. 2026-01-05), instead
            of the lookback window. Empty: from the table's first date when end_date is set.
        end_date: Backfill: last cursor date to reload, inclusive, YYYY-MM-DD. Empty: up to the
            newest date in the source when start_date is set.
        full_refresh: true: reload whole tables and rebuild every dbt model from scratch
            (slow). Leave the dates empty with it.
        dry_run: true: plan only (tables, slices, estimated BigQuery bytes); writes nothing but
            the run's audit record.
        force: true: also refresh tables that are not due yet, and disabled tables named in
            `tables`.
        trigger: A label stored with the run in the audit (1-40 characters): `manual` by
            default; `schedule` (set by the schedule) makes due times count from this run.
    """
    logger = get_run_logger()
    t0 = time.monotonic()
    settings = get_settings()
    params = run_params.validate_params(tables, start_date, end_date, full_refresh, dry_run, force, trigger)
    anchor = run_plan.run_anchor(_scheduled_start(), datetime.now(UTC))
    clients = make_clients(settings)
    try:
        # BigQuery unreachable: fail within REFRESH_BQ_TIMEOUT_S, before any run row is written.
        check_reachable(clients)
        chosen = run_plan.plan_tables(settings, clients, params, now=anchor)
        logger.info("plan: %s", ", ".join(c.table_name for c in chosen) or "no table is due")
        # One refresh at a time: a second run fails here at once, having changed nothing.
        with _refresh_lock(settings, params.trigger) as lock_conn:
            run = run_record.begin_run(lock_conn, settings, flow_run_id=_flow_run_id(), params=params)
            outcomes: list[TableOutcome] = []
            try:
                outcomes = extract(settings, clients, chosen, run.run_id, params.options)
                checks = post_load_checks.validate_after_refresh(
                    settings, clients, chosen, outcomes, run.run_id, params.dry_run
                )
                if not params.dry_run:
                    _check_lock(settings, run.run_id, "before dbt")
                run_plan.advance_due_times(
                    lock_conn, settings, chosen, outcomes, anchor, scheduled=params.scheduled
                )
                dbt = (
                    None
                    if params.dry_run
                    else transform(
                        settings,
                        outcomes,
                        run.run_id,
                        params.full_refresh,
                        explicit_range=params.options.explicit_range,
                    )
                )
                shadow = (
                    None
                    if params.dry_run
                    else post_load_checks.shadow_step(settings, outcomes, run.run_id, params.full_refresh)
                )
                summary = run_summary.summarise(
                    run.run_id,
                    outcomes,
                    dbt,
                    params.dry_run,
                    flow_run_id=_flow_run_id(),
                    duration_s=time.monotonic() - t0,
                    validation=checks,
                    shadow=shadow,
                )
            except BaseException as exc:
                message = redact(_failure_message(exc, outcomes))
                _end_run(
                    settings,
                    run,
                    runs.RunSummary(str(run.run_id), RunStatus.FAILED, message, dry_run=params.dry_run),
                )
                if isinstance(exc, psycopg.OperationalError):
                    raise PostgresLostError(message) from exc
                if isinstance(exc, RefreshError):
                    raise RefreshFailed(message) from exc
                raise
            summary = _end_run(settings, run, summary)
            if not params.dry_run:
                # Every slice and dbt transaction is over: the replaced rows are dead to all.
                maintenance.vacuum_after_run(
                    settings, [(o.table_name, o.mode, o.rows_deleted) for o in outcomes]
                )
    except psycopg.OperationalError as exc:
        # Before the run row exists (planning) or while taking the lock: nothing was written.
        raise PostgresLostError(
            f"cannot reach Postgres ({redact(one_line(exc))}): this run did nothing; start Postgres "
            "or fix REFRESH_PG_DSN, then run again"
        ) from exc
    finally:
        clients.close()
        # Bounded (REFRESH_WEBHOOK_RUN_DEADLINE_S), never raises; housekeeping sends the rest.
        webhook_delivery.dispatch_after_run(settings)
    create_markdown_artifact(
        markdown=run_report.markdown_report(summary, settings),
        key="refresh-report",
        description=f"refresh {summary.status}: {summary.message}"[:500],
    )
    logger.info("run %s ended %s: %s", run.run_id, summary.status, summary.message)
    if summary.status == RunStatus.FAILED:
        raise RefreshFailed(summary.message)
    # A warning run completed (the other tables are in), but shows as "Warning" in the UI.
    name = "Warning" if summary.status == RunStatus.WARNING else "Completed"
    return Completed(name=name, message=summary.message, data=summary.to_dict())
