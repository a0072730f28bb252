"""What several benchmarks share: a throwaway stack's environment, a standing Prefect server
(flows.demo.local_stack), and refreshing a table the way a run does (the registry row, the
refresh lock, a run row), so no script repeats it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flows.demo.local_stack import free_port, standing_prefect_server

__all__ = ["refresh", "register", "standing_prefect_server", "throwaway_env"]

if TYPE_CHECKING:
    from flows.core.settings import Settings
    from flows.core.table_config import TableConfig
    from flows.engine.bigquery import BigQueryClients
    from flows.engine.table_refresh import TableOutcome


def throwaway_env(state: str, dataset: str, **extra: str) -> None:
    """Point this process's settings at a throwaway stack under `state`, on free ports.

    Call before importing anything that reads settings; REFRESH_* variables of the caller's
    shell are dropped (REFRESH_PG_DSN excepted: a real Postgres may be given).
    """
    for var in [v for v in os.environ if v.startswith("REFRESH_") and v != "REFRESH_PG_DSN"]:
        del os.environ[var]
    os.environ.update(
        {
            "REFRESH_STATE_DIR": state,
            "REFRESH_LOCAL_PG_PORT": str(free_port()),
            "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
            "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
            "REFRESH_BQ_DATASET": dataset,
            **extra,
        }
    )


def register(settings: Settings, configs: list[TableConfig]) -> None:
    """The tables' registry rows (as `refresh registry sync` writes them)."""
    import psycopg

    from flows.control import registry

    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        registry.sync_from_file(conn, settings.control_schema, configs)


def refresh(
    settings: Settings, clients: BigQueryClients, cfg: TableConfig, full_refresh: bool = True
) -> TableOutcome:
    """One table refreshed as a run does it: under the refresh lock, with its own run row (the
    previous bench run's row marked abandoned); fails loudly unless it succeeded."""
    from flows.control import runs
    from flows.engine.table_refresh import RefreshOptions, refresh_table

    with runs.refresh_lock(settings, wait_s=30) as lock:
        runs.mark_abandoned(lock, settings.control_schema)
        run = runs.start_run(lock, settings.control_schema, flow_run_id=None, trigger="bench", params={})
        outcome = refresh_table(settings, clients, cfg, run.run_id, RefreshOptions(full_refresh=full_refresh))
    assert outcome.status == "success", outcome.error
    return outcome
