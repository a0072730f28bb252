"""After a live refresh: validate exactly the periods the run committed (source match), with
the run id, reusing the load's and change detection's fingerprints where they are proven
current (flows.engine.validation.source_match.validate_table says when).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg

from flows.control import tables
from flows.control.fingerprints import PlanFingerprints
from flows.control.statuses import TableStatus
from flows.core.db import connect
from flows.core.errors import ConfigError, RefreshError
from flows.core.redact import error_text
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig
from flows.engine.bigquery import BigQueryClients
from flows.engine.fingerprinting import QueryStats
from flows.engine.validation.source_match import LoadedBy, record_results, validate_table

# A registry table opts out of the after-refresh step with custom_params {"validate_after_refresh": false}.
AFTER_REFRESH_PARAM = "validate_after_refresh"


@dataclass
class AfterRefresh:
    """What validating one table's touched periods added to a run."""

    table_name: str
    periods: int = 0
    # periods whose Postgres side was the load's fingerprint (unchanged_since_load)
    periods_from_load: int = 0
    # periods whose BigQuery side was change detection's fingerprint of the run's plan
    periods_bigquery_from_plan: int = 0
    failed: list[str] = field(default_factory=list)
    bytes_processed: int = 0
    duration_s: float = 0.0
    skipped: str | None = None  # why it was not validated
    error: str | None = None  # why validation could not run

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table_name,
            "periods": self.periods,
            "periods_from_load": self.periods_from_load,
            "periods_bigquery_from_plan": self.periods_bigquery_from_plan,
            "failed": self.failed,
            "bytes_processed": self.bytes_processed,
            "duration_s": round(self.duration_s, 2),
            "skipped": self.skipped,
            "error": self.error,
        }


def validated_after_refresh(cfg: TableConfig) -> bool:
    """A live run of this table validates the periods it commits (unless the refresh fails)."""
    return cfg.mode is Mode.LIVE and cfg.custom_params.get(AFTER_REFRESH_PARAM, True) is not False


def _skip_reason(cfg: TableConfig, status: str, dry_run: bool) -> str | None:
    if dry_run or cfg.mode is not Mode.LIVE:
        return f"mode {'dry_run' if dry_run else cfg.mode.value}: not live"
    if status != TableStatus.SUCCESS:
        return f"refresh {status}"
    if cfg.custom_params.get(AFTER_REFRESH_PARAM, True) is False:
        return f"custom_params.{AFTER_REFRESH_PARAM} is false"
    return None


def validate_touched(
    settings: Settings,
    clients: BigQueryClients,
    cfg: TableConfig,
    status: str,
    run_id: UUID,
    dry_run: bool = False,
    plan: PlanFingerprints | None = None,
) -> AfterRefresh:
    """Validate exactly the periods the run committed for one live table and record them with
    the run id (`validation.failed` on a difference). BigQuery's side of a period the run's
    change detection fingerprinted is that fingerprint (`plan`, from the table's outcome).
    Never raises: a validation that cannot run (BigQuery down, a bad key_columns) comes back
    in `error`."""
    out = AfterRefresh(cfg.table_name, skipped=_skip_reason(cfg, status, dry_run))
    if out.skipped:
        return out
    started = time.monotonic()
    stats = QueryStats()
    try:
        with connect(settings, autocommit=True) as conn:
            touched = tables.touched_slices(conn, settings.control_schema, run_id, cfg.table_name)
            if not touched:
                out.skipped = "no slice committed (unchanged)"
                return out
            dated = [t for t in touched if t is not None]
            whole = len(dated) < len(touched)
            first = None if whole else dated[0][0]
            last = None if whole else max(b for _, b in dated) - timedelta(days=1)
            periods = None if whole else frozenset(a for a, _ in dated)
            loaded = LoadedBy(settings.control_schema, run_id, periods)
            results = validate_table(
                clients, conn, cfg, settings.raw_schema, first, last, stats, loaded, plan
            )
            record_results(conn, settings.control_schema, cfg, results, run_id)
        out.periods = len(results)
        out.periods_from_load = sum(r.postgres_from_load for r in results)
        out.periods_bigquery_from_plan = sum(r.bigquery_from_plan for r in results)
        out.failed = [str(r.period_start) if r.period_start else "full" for r in results if not r.passed]
    except (RefreshError, ConfigError, psycopg.Error) as exc:
        out.error = error_text(exc)
    finally:
        out.bytes_processed = stats.bytes
        out.duration_s = time.monotonic() - started
    return out
