"""The checks after the loads: each live table against BigQuery, and the shadow build
compared with live."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from flows.control import dbt_audit
from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.core.db import connect
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig
from flows.engine import transform
from flows.engine.bigquery import BigQueryClients
from flows.engine.validation.after_refresh import AfterRefresh, validate_touched
from flows.engine.validation.shadow_match import compare_shadow, record_shadow
from flows.orchestration.dbt_selection import dbt_sources


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
        validate_touched(
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
                results = compare_shadow(conn, transform.SHADOW_SUFFIX)
            dbt_audit.record_dbt(conn, settings.control_schema, dbt, run_id, None, began, datetime.now(UTC))
            record_shadow(conn, settings.control_schema, results, run_id)
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
