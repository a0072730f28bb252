"""The walking skeleton, end to end: generate -> extract -> load -> dbt -> audit, twice."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from flows.core.db import use_utc
from flows.demo.sample_data import DAILY_TABLE, PRODUCTS_TABLE, SQP_TABLE
from flows.engine.bigquery import BigQueryClients
from tests.integration.conftest import SPEC, bq_scalar, pg_scalar


@pytest.fixture(scope="module")
def first_run(refreshed: dict[str, Any]) -> dict[str, Any]:
    return refreshed


def source(clients: BigQueryClients, table: str) -> str:
    return f"`{clients.project}.{clients.dataset}.{table}`"


def test_generated_funnels_are_consistent(first_run: dict[str, Any], clients: BigQueryClients) -> None:
    t = source(clients, SQP_TABLE)
    bad = bq_scalar(
        clients,
        f"""
        select countif(`ASIN Impression Count` < `ASIN Click Count`
                    or `ASIN Click Count` < `ASIN Cart Add Count`
                    or `ASIN Cart Add Count` < `ASIN Purchase Count`
                    or `Total Query Impression Count` < `Total Click Count`
                    or `Total Click Count` < `Total Cart Add Count`
                    or `Total Cart Add Count` < `Total Purchase Count`
                    or `ASIN Impression Share` < 0 or `ASIN Impression Share` > 1
                    or `ASIN Purchase Share` < 0 or `ASIN Purchase Share` > 1) from {t}""",
    )
    assert bad == 0
    assert bq_scalar(clients, f"select countif(`Parent ASIN` is null) from {t}") > 0
    assert bq_scalar(clients, f"select count(distinct `Date`) from {t}") == SPEC.weeks


def test_run_succeeds_and_raw_counts_equal_source(
    first_run: dict[str, Any], pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    assert first_run["status"] == "success", first_run["message"]
    for table in (SQP_TABLE, PRODUCTS_TABLE, DAILY_TABLE):
        expected = bq_scalar(clients, f"select count(*) from {source(clients, table)}")
        assert pg_scalar(pg, f'select count(*) from raw."{table}"') == expected, table
    assert first_run["dbt_models_built"] >= 5 and not first_run["dbt_failed"]


def test_mart_sums_equal_source_sums(
    first_run: dict[str, Any], pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    src = bq_scalar(
        clients,
        f"""
        select to_json_string(struct(sum(`ASIN Impression Count`) as i, sum(`ASIN Click Count`) as c,
               sum(`ASIN Cart Add Count`) as a, sum(`ASIN Purchase Count`) as p,
               sum(`Total Query Impression Count`) as ti, count(*) as n))
        from {source(clients, SQP_TABLE)}""",
    )
    import json

    expected = json.loads(src)
    got = pg.execute("""
        select sum(asin_impression_count), sum(asin_click_count), sum(asin_cart_add_count),
               sum(asin_purchase_count), sum(total_query_impression_count), count(*)
        from marts.search_query_performance""").fetchone()
    assert got is not None
    assert [int(v) for v in got] == [int(expected[k]) for k in ("i", "c", "a", "p", "ti", "n")]
    # summaries agree with the mart too
    weekly = pg_scalar(pg, "select sum(impressions) from summaries.weekly_summary")
    assert int(weekly) == int(expected["i"])


def test_numeric_unicode_nulls_and_timezones_round_trip(
    first_run: dict[str, Any], pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    t = source(clients, SQP_TABLE)
    src = bq_scalar(
        clients,
        f"""
        select to_json_string(struct(
          sum(`Total Median Click Price Amount`) as price, countif(`Total Median Click Price Amount` is null) as nulls,
          countif(`Parent ASIN` is null) as null_parents, min(`Date`) as first_week,
          string_agg(distinct `Search Query`, '|' order by `Search Query`) as queries)) from {t}""",
    )
    import json
    from decimal import Decimal

    exp = json.loads(src)
    # Read in UTC like every session of the product: the database's default zone is not.
    use_utc(pg)
    row = pg.execute("""
        select sum(total_median_click_price_amount), count(*) filter (where total_median_click_price_amount is null),
               count(*) filter (where parent_asin is null), min(date),
               string_agg(distinct search_query, '|')
        from raw.search_query_performance""").fetchone()
    assert row is not None
    assert row[0] == Decimal(str(exp["price"]))
    assert (row[1], row[2]) == (exp["nulls"], exp["null_parents"])
    assert row[3].isoformat().startswith(exp["first_week"][:10]) and row[3].utcoffset().total_seconds() == 0
    assert set(row[4].split("|")) == set(exp["queries"].split("|"))
    assert any(ord(ch) > 0x3000 for ch in row[4])  # CJK survived


def test_audit_rows_link_run_tables_slices_and_dbt(first_run: dict[str, Any], pg: psycopg.Connection) -> None:
    run_id = first_run["run_id"]
    status, tables_ok, dbt_inv = pg.execute(
        "select status, tables_succeeded, dbt_invocation_id from refresh_control.refresh_runs where run_id = %s",
        (run_id,),
    ).fetchone()  # type: ignore[misc]
    assert status == "success" and tables_ok == 3 and dbt_inv
    per_table = dict(
        pg.execute(
            "select table_name, rows_inserted from refresh_control.table_refreshes where run_id = %s",
            (run_id,),
        ).fetchall()
    )
    assert per_table[SQP_TABLE] == SPEC.sqp_rows
    slices = pg_scalar(
        pg,
        "select sum(rows_inserted) from refresh_control.slice_refreshes "
        "where run_id = %s and table_name = %s",
        (run_id, SQP_TABLE),
    )
    assert slices == SPEC.sqp_rows
    nodes = pg_scalar(
        pg, "select count(*) from refresh_control.dbt_node_runs where invocation_id = %s", (dbt_inv,)
    )
    assert nodes > 10
    # lineage columns carry the id of the run that loaded the rows: this one, unless a test
    # before this one reloaded the catalog (test_changed_periods does)
    assert (
        pg_scalar(
            pg,
            "select count(*) from refresh_control.slice_refreshes where run_id = %s and table_name = 'products' "
            "and status = 'success' and rows_inserted = %s",
            (run_id, SPEC.asins),
        )
        == 1
    )
    loaded_by = pg_scalar(
        pg,
        "select run_id::text from refresh_control.slice_refreshes where table_name = 'products' "
        "and status = 'success' order by finished_at desc limit 1",
    )
    assert pg_scalar(pg, "select count(distinct _run_id) from raw.products") == 1
    assert str(pg_scalar(pg, "select max(_run_id::text) from raw.products")) == loaded_by


def test_second_run_duplicates_nothing(
    first_run: dict[str, Any], pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    from flows.orchestration.daily_refresh import daily_refresh

    before = pg_scalar(pg, "select count(*) from raw.search_query_performance")
    second = daily_refresh(force=True, trigger="test")
    assert second["status"] == "success", second["message"]
    sqp = next(t for t in second["tables"] if t["table"] == SQP_TABLE)
    # Nothing changed in the source: the lookback window's slices are fingerprinted, found
    # unchanged and not read (tests/integration/test_change_detection.py re-reads).
    assert sqp["slices"] == 0
    unchanged = pg_scalar(
        pg,
        "select slices_unchanged from refresh_control.table_refreshes where run_id = %s and table_name = %s",
        (second["run_id"], SQP_TABLE),
    )
    assert 0 < unchanged < SPEC.weeks  # only the lookback window
    # Every table unchanged, the whole-table products included, and no rebuild owed (the first
    # run's dbt build succeeded): dbt is not run at all.
    assert all(t["slices"] == 0 for t in second["tables"]), second["tables"]
    assert first_run["dbt_invocation_id"] is not None and second["dbt_invocation_id"] is None, second
    assert pg_scalar(pg, "select count(*) from raw.search_query_performance") == before
    dupes = pg_scalar(
        pg,
        """select count(*) from (select 1 from marts.search_query_performance
                             group by week_start, asin, search_query having count(*) > 1) d""",
    )
    assert dupes == 0
    assert pg_scalar(pg, "select count(*) from marts.search_query_performance") == SPEC.sqp_rows
