"""The Prefect flow: reads like the runbook (prepare -> plan -> extract -> transform -> record).

The work lives in plain functions (flows.runbook, flows.refresh, flows.transform); this module
only wires them into Prefect tasks so each table and each dbt node shows up in the UI.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows import runbook
from flows.audit import refresh_lock
from flows.bigquery import BigQueryClients, make_clients
from flows.db import connect
from flows.errors import RefreshError
from flows.refresh import RefreshOptions, TableOutcome, refresh_table
from flows.registry import TableConfig
from flows.settings import Settings, get_settings
from flows.transform import DbtOutcome, record_dbt, run_dbt


class RefreshFailed(RefreshError):
    """The run ended `failed`: every table failed, or dbt could not run."""


@task(name="refresh-table", task_run_name="refresh {cfg.table_name}", cache_policy=NO_CACHE)
def refresh_table_task(
    settings: Settings, clients: BigQueryClients, cfg: TableConfig, run_id: UUID, options: RefreshOptions
) -> TableOutcome:
    return refresh_table(settings, clients, cfg, run_id, options)


def _flow_run_id() -> UUID | None:
    ctx = get_run_context()
    return getattr(getattr(ctx, "flow_run", None), "id", None)


def _extract_and_transform(
    settings: Settings,
    clients: BigQueryClients,
    chosen: list[TableConfig],
    run_id: UUID,
    options: RefreshOptions,
) -> runbook.RunSummary:
    logger = get_run_logger()
    logger.info(
        "run %s: %d table(s): %s", run_id, len(chosen), ", ".join(c.table_name for c in chosen) or "none due"
    )
    futures = [refresh_table_task.submit(settings, clients, c, run_id, options) for c in chosen]
    outcomes = [f.result() for f in futures]

    dbt: DbtOutcome | None = None
    args = None if options.dry_run else runbook.dbt_build_args(outcomes, options.full_refresh)
    if args is not None:
        started = datetime.now(UTC)
        dbt = run_dbt(settings, args)
        with connect(settings, autocommit=True) as conn:
            record_dbt(conn, settings.control_schema, dbt, run_id, _flow_run_id(), started, datetime.now(UTC))
    return runbook.summarise(run_id, outcomes, dbt, options.dry_run)


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
) -> dict[str, object]:
    """Refresh the due tables (or `tables`) from BigQuery into Postgres, then build dbt."""
    logger = get_run_logger()
    settings = get_settings()
    runbook.validate_params(start_date, end_date)
    options = RefreshOptions(start_date, end_date, full_refresh, dry_run)
    clients = make_clients(settings)
    try:
        configs = runbook.prepare(settings, clients, register_new=not dry_run)
        chosen = runbook.select_tables(configs, tables, force=force or bool(tables), now=datetime.now(UTC))
        params = {
            "tables": tables,
            "start_date": start_date,
            "end_date": end_date,
            "full_refresh": full_refresh,
            "dry_run": dry_run,
            "force": force,
        }
        with refresh_lock(settings) as lock_conn:
            run = runbook.begin_run(
                lock_conn, settings, flow_run_id=_flow_run_id(), trigger=trigger, params=params
            )
            try:
                summary = _extract_and_transform(settings, clients, chosen, run.run_id, options)
            except Exception as exc:
                summary = runbook.RunSummary(
                    str(run.run_id), "failed", f"run crashed: {exc}", dry_run=dry_run
                )
                runbook.finish_run(lock_conn, settings, run, summary)
                raise
            runbook.finish_run(lock_conn, settings, run, summary)
        create_markdown_artifact(
            markdown=runbook.markdown_report(summary, settings),
            key="refresh-report",
            description="daily refresh summary",
        )
        logger.info("run %s ended %s: %s", run.run_id, summary.status, summary.message)
        if summary.status == "failed":
            raise RefreshFailed(summary.message)
        return summary.to_dict()
    finally:
        clients.close()
