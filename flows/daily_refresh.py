"""The Prefect flow: reads like the runbook (validate -> plan -> extract -> transform -> record).

The work lives in plain functions (flows.runbook, flows.refresh, flows.transform); this module
only wires them into Prefect tasks so each table and each dbt node shows up in the UI.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.runtime import task_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows import runbook
from flows.audit import refresh_lock
from flows.bigquery import BigQueryClients, make_clients
from flows.db import connect
from flows.errors import RefreshError, TransientError
from flows.redact import redact
from flows.refresh import RefreshOptions, TableOutcome, refresh_table
from flows.registry import TableConfig
from flows.settings import Settings, get_settings
from flows.transform import DbtOutcome, record_dbt, run_dbt

# A table whose slices still fail transiently after refresh_table's own backoff (2, 4, 8 s)
# is tried again later as a whole: its committed slices are kept and skipped.
TABLE_RETRY_DELAYS_S: list[float] = [30, 120]


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
    retries=len(TABLE_RETRY_DELAYS_S),
    retry_delay_seconds=TABLE_RETRY_DELAYS_S,
    retry_condition_fn=_retry_transient_only,
)
def refresh_table_task(
    settings: Settings, clients: BigQueryClients, cfg: TableConfig, run_id: UUID, options: RefreshOptions
) -> TableOutcome:
    """One table; permanent failures come back in the outcome at once, transient ones retry."""
    outcome = refresh_table(settings, clients, cfg, run_id, options)
    if outcome.retryable and task_run.run_count <= len(TABLE_RETRY_DELAYS_S):
        raise TransientError(f"{cfg.table_name}: {outcome.error}")
    return outcome


def _flow_run_id() -> UUID | None:
    ctx = get_run_context()
    return getattr(getattr(ctx, "flow_run", None), "id", None)


def _outcome(cfg: TableConfig, future: PrefectFuture[TableOutcome]) -> TableOutcome:
    """The table's outcome; a crash of one table's task is that table's failure only."""
    try:
        return future.result()
    except Exception as exc:
        return TableOutcome(
            cfg.table_name, "failed", cfg.mode.value, error=f"unexpected error: {redact(repr(exc))}"
        )


def extract(
    settings: Settings,
    clients: BigQueryClients,
    chosen: list[TableConfig],
    run_id: UUID,
    options: RefreshOptions,
) -> list[TableOutcome]:
    """Every chosen table, concurrently (bounded by the task runner); never raises."""
    futures = [refresh_table_task.submit(settings, clients, c, run_id, options) for c in chosen]
    return [_outcome(c, f) for c, f in zip(chosen, futures, strict=True)]


def transform(
    settings: Settings, outcomes: list[TableOutcome], run_id: UUID, full_refresh: bool
) -> DbtOutcome | None:
    """dbt build (models and their tests) of what is downstream of the changed sources."""
    sources = runbook.dbt_sources(settings.dbt_project_dir)
    args = runbook.dbt_build_args(outcomes, full_refresh, sources)
    if args is None:
        return None
    started = datetime.now(UTC)
    dbt = run_dbt(settings, args)
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

    tables: refresh exactly these (registry names), due or not; empty = every due table.
    start_date / end_date: reload this range of the cursor (backfill) instead of the lookback.
    full_refresh: reload whole tables and rebuild the dbt models from scratch.
    dry_run: plan only (slices, estimated bytes); writes nothing but the run's audit record.
    force: refresh tables that are not due yet, and disabled tables named in `tables`.
    """
    logger = get_run_logger()
    t0 = time.monotonic()
    settings = get_settings()
    params = runbook.validate_params(tables, start_date, end_date, full_refresh, dry_run, force, trigger)
    clients = make_clients(settings)
    try:
        chosen = runbook.plan_tables(settings, clients, params, now=datetime.now(UTC))
        logger.info("plan: %s", ", ".join(c.table_name for c in chosen) or "no table is due")
        # One refresh at a time: a second run fails here at once, having changed nothing.
        with refresh_lock(settings) as lock_conn:
            run = runbook.begin_run(lock_conn, settings, flow_run_id=_flow_run_id(), params=params)
            try:
                outcomes = extract(settings, clients, chosen, run.run_id, params.options)
                dbt = (
                    None if params.dry_run else transform(settings, outcomes, run.run_id, params.full_refresh)
                )
                summary = runbook.summarise(
                    run.run_id,
                    outcomes,
                    dbt,
                    params.dry_run,
                    flow_run_id=_flow_run_id(),
                    duration_s=time.monotonic() - t0,
                )
            except BaseException as exc:
                crashed = runbook.RunSummary(
                    str(run.run_id), "failed", f"run crashed: {redact(repr(exc))}", dry_run=params.dry_run
                )
                runbook.finish_run(lock_conn, settings, run, crashed)
                raise
            runbook.finish_run(lock_conn, settings, run, summary)
    finally:
        clients.close()
    create_markdown_artifact(
        markdown=runbook.markdown_report(summary, settings),
        key="refresh-report",
        description=f"refresh {summary.status}: {summary.message}"[:500],
    )
    logger.info("run %s ended %s: %s", run.run_id, summary.status, summary.message)
    if summary.status == "failed":
        raise RefreshFailed(summary.message)
    # A warning run completed (the other tables are in), but shows as "Warning" in the UI.
    name = "Warning" if summary.status == "warning" else "Completed"
    return Completed(name=name, message=summary.message, data=summary.to_dict())
