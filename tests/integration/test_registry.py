"""Table registry against real Postgres and the emulator: file sync, user edits, auto-registration."""

from __future__ import annotations

import psycopg
import pytest
from google.cloud import bigquery

from flows.control import registry
from flows.core.errors import ConfigError
from flows.core.settings import get_settings
from flows.engine.bigquery import BigQueryClients, make_clients
from flows.orchestration import run_plan


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, stack: object) -> BigQueryClients:
    # Own dataset and control schema: auto-registered tables must not appear in other tests' runs.
    monkeypatch.setenv("REFRESH_BQ_DATASET", "reg_ds")
    monkeypatch.setenv("REFRESH_CONTROL_SCHEMA", "reg_control")
    settings = get_settings()
    clients = make_clients(settings)
    ds = f"{clients.project}.reg_ds"
    clients.rest.create_dataset(ds, exists_ok=True)
    for t in ("search_query_performance", "products", "daily_search_terms", "New_Vendor_Table"):
        clients.rest.delete_table(f"{ds}.{t}", not_found_ok=True)
        clients.rest.create_table(bigquery.Table(f"{ds}.{t}", schema=[bigquery.SchemaField("x", "INT64")]))
    return clients


def test_new_source_table_is_registered_in_dry_run_once_with_an_event(isolated: BigQueryClients) -> None:
    settings = get_settings()
    configs = run_plan.register_new_tables(settings, isolated, run_plan.prepare(settings))
    new = {c.table_name: c for c in configs}["new_vendor_table"]
    assert (new.source_table, new.mode.value, new.write_strategy.value, new.origin) == (
        "New_Vendor_Table",
        "dry_run",
        "full_replace",
        "auto",
    )
    # second run: nothing new
    run_plan.register_new_tables(settings, isolated, run_plan.prepare(settings))
    with psycopg.connect(settings.dsn()) as conn:
        events = conn.execute(
            "select count(*) from reg_control.events where event = 'table.registered' and table_name = %s",
            ("new_vendor_table",),
        ).fetchone()
    assert events == (1,)


def test_user_edits_win_over_the_file_and_bad_edits_change_nothing(isolated: BigQueryClients) -> None:
    settings = get_settings()
    run_plan.prepare(settings)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        registry.update(conn, "reg_control", "products", {"priority": 55, "mode": "shadow"})
        with pytest.raises(ConfigError, match="priority"):
            registry.update(conn, "reg_control", "products", {"priority": 5000})
        with pytest.raises(ConfigError, match="cannot set"):
            registry.update(conn, "reg_control", "products", {"source_table": "x; drop"})
    configs = {c.table_name: c for c in run_plan.prepare(settings)}
    assert (configs["products"].priority, configs["products"].mode.value, configs["products"].origin) == (
        55,
        "shadow",
        "user",
    )
    # rows nobody edited still follow the file
    assert configs["search_query_performance"].lookback_days == 60
