"""Housekeeping: runs left behind by dead processes, expired checkpoints, old audit rows.

Plain functions (tests and the CLI call them directly) and the hourly `housekeeping` flow.
None of them takes the refresh lock, so housekeeping never makes a starting refresh fail as
busy, and each is safe to run while a refresh is in progress.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.control import checkpoints, runs, triggers
from flows.control.dbt_audit import record_dbt
from flows.core.db import connect, migrate
from flows.core.errors import ConfigError
from flows.core.settings import Settings, get_settings
from flows.engine import maintenance, transform
from flows.notify import webhook_delivery, webhook_events

DEFAULT_CHECKPOINT_RETENTION_DAYS = 90
DEFAULT_AUDIT_RETENTION_DAYS = 365


def _check_retention(days: int, what: str) -> None:
    # Checkpoints of the last 24 h resume an interrupted refresh: never expire those.
    if not 1 <= days <= 36_500:
        raise ConfigError(f"{what} retention must be between 1 and 36500 days, got {days}")


def mark_abandoned_runs(settings: Settings) -> int:
    """Runs still `running` while nobody holds the refresh lock become `abandoned`; each one's
    refresh.failed event commits with it."""
    with connect(settings) as conn, conn.transaction():
        n = runs.mark_abandoned(conn, settings.control_schema)
        webhook_events.runs_abandoned(conn, settings)
        return n


def cleanup_checkpoints(settings: Settings, retention_days: int = DEFAULT_CHECKPOINT_RETENTION_DAYS) -> int:
    """Delete checkpoints committed more than `retention_days` ago; returns how many.

    The checkpoint with the newest slice end of each table is always kept: it is the table's
    high-water mark, and without it the next run would reload the whole table. Sliced and
    full-replace checkpoints are kept apart, as the high-water mark only reads sliced ones.
    """
    _check_retention(retention_days, "checkpoint")
    with connect(settings, autocommit=True) as conn:
        return checkpoints.expire(conn, settings.control_schema, retention_days)


def prune_audit(settings: Settings, retention_days: int = DEFAULT_AUDIT_RETENTION_DAYS) -> dict[str, int]:
    """Delete runs (with their table, slice, dbt and data-quality rows), events and API
    triggers older than `retention_days`; returns rows deleted per table.

    Running runs are never deleted, nor the latest run of any table, so `refresh status` and
    the freshness views still know when every table was last refreshed.
    """
    _check_retention(retention_days, "audit")
    with connect(settings) as conn:
        deleted = runs.prune(conn, settings.control_schema, retention_days)
        deleted["api_triggers"] = triggers.prune(conn, settings.control_schema, retention_days)
        return deleted


# The weekly full `dbt test` waits at most this long for a running refresh to end.
FULL_TEST_WAIT_S = 3600.0


def run_full_dbt_test(
    settings: Settings, wait_s: float = FULL_TEST_WAIT_S, poll_s: float = 30.0
) -> dict[str, Any]:
    """`dbt test` of every node over every row (no refresh var): the safety net under the daily
    runs, whose tests read only the periods they rebuilt. Recorded in dbt_invocations (no run).

    Started while a refresh runs, it waits for it to end (a test reading a model mid-rebuild
    could fail for nothing), up to `wait_s`.
    """
    waited = time.monotonic() + wait_s
    with connect(settings, autocommit=True) as conn:
        while runs.refresh_running(conn):
            if time.monotonic() >= waited:
                raise RuntimeError(
                    f"full dbt test: a refresh was still running after {wait_s:.0f}s; not tested, "
                    "the next weekly run tests again (or run `dbt test` by hand)"
                )
            time.sleep(poll_s)
    started = datetime.now(UTC)
    dbt = transform.run_dbt(settings, ["test"])
    with connect(settings, autocommit=True) as conn:
        flow_run_id = flow_run.id
        record_dbt(
            conn,
            settings.control_schema,
            dbt,
            None,
            None if flow_run_id is None else UUID(flow_run_id),
            started,
            datetime.now(UTC),
        )
    return {
        "invocation_id": dbt.invocation_id,
        "success": dbt.success,
        "tests": len(dbt.nodes),
        "failed": [n["name"] for n in dbt.failed_nodes],
        "message": dbt.message,
    }


@dataclass
class HousekeepingResult:
    runs_abandoned: int
    checkpoints_deleted: int
    audit_rows_deleted: dict[str, int] = field(default_factory=dict)
    webhooks: dict[str, int] = field(default_factory=dict)
    raw_tables_vacuumed: dict[str, float] = field(default_factory=dict)
    # The weekly full `dbt test` (full_dbt_test), when this run did it.
    dbt_test: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dispatch_webhooks(settings: Settings) -> dict[str, int]:
    """Deliver the webhook events left over (receiver down, run killed before dispatch) and the
    retries that fall due within REFRESH_WEBHOOK_HOUSEKEEPING_DEADLINE_S."""
    return webhook_delivery.dispatch(
        settings, deadline_s=settings.webhook_housekeeping_deadline_s, wait=True
    ).to_dict()


@flow(name="housekeeping", log_prints=True)
def housekeeping(
    checkpoint_retention_days: int = DEFAULT_CHECKPOINT_RETENTION_DAYS,
    audit_retention_days: int | None = DEFAULT_AUDIT_RETENTION_DAYS,
    full_dbt_test: bool = False,
) -> dict[str, Any]:
    """Mark abandoned runs, expire old checkpoints, (unless audit_retention_days is empty)
    prune old audit rows, and vacuum raw tables holding many dead rows; on the weekly schedule
    also run the full `dbt test`.

    Args:
        checkpoint_retention_days: Delete checkpoints committed more than this many days ago
            (1-36500, default 90); each table's newest checkpoint (its high-water mark) is kept.
        audit_retention_days: Delete runs and their table, slice, dbt and event rows, and API
            triggers, older than this many days (1-36500, default 365); the latest run of
            every table is kept.
            Empty: keep the audit forever.
        full_dbt_test: Also run `dbt test` over every row (the weekly schedule sets it); the
            run fails when a test fails, after the other housekeeping is done.
    """
    logger = get_run_logger()
    _check_retention(checkpoint_retention_days, "checkpoint")
    if audit_retention_days is not None:
        _check_retention(audit_retention_days, "audit")
    settings = get_settings()
    migrate(settings)
    result = HousekeepingResult(
        runs_abandoned=mark_abandoned_runs(settings),
        checkpoints_deleted=cleanup_checkpoints(settings, checkpoint_retention_days),
        audit_rows_deleted=(
            prune_audit(settings, audit_retention_days) if audit_retention_days is not None else {}
        ),
        webhooks=dispatch_webhooks(settings),
        raw_tables_vacuumed=maintenance.vacuum_bloated_raw_tables(settings),
    )
    if full_dbt_test:
        result.dbt_test = run_full_dbt_test(settings)
    logger.info(
        "housekeeping: %d run(s) marked abandoned, %d checkpoint(s) expired, audit rows deleted: %s; "
        "webhooks: %s; raw tables vacuumed: %s",
        result.runs_abandoned,
        result.checkpoints_deleted,
        result.audit_rows_deleted or "none (audit retention off)",
        result.webhooks,
        result.raw_tables_vacuumed or "none",
    )
    if result.dbt_test is not None and not result.dbt_test["success"]:
        raise RuntimeError(
            f"full dbt test failed: {result.dbt_test['failed'] or result.dbt_test['message']} "
            f"(dbt invocation {result.dbt_test['invocation_id']})"
        )
    return result.to_dict()
