"""dbt's output against an independent computation from the generated source, and dbt auditing.

The weekly/monthly/quarterly/yearly summaries are recomputed here from the BigQuery source in
plain Python + pyarrow, from SPEC.md's metric definitions, and every row is compared exactly
(keys, sums, ratios as Decimal rounded half away from zero like Postgres' round(numeric),
active weeks). Then an old week is restated in BigQuery, the flow backfills it, and the
summaries must match the recomputation again while periods before the rebuilt ones keep the
dbt invocation that built them. The source is put back afterwards, so later modules see the
session's data as generated.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any
from uuid import uuid4

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flows.control.dbt_audit import DbtOutcome, NodeRun, record_dbt
from flows.core.db import migrate
from flows.core.settings import Settings
from flows.demo.sample_data import SQP_TABLE
from flows.engine.bigquery import BigQueryClients
from flows.engine.transform import invoke_plain_dbt, run_dbt, target_dir
from tests.integration.conftest import SPEC, pg_scalar

SUMMARY_TABLES = {
    "week": "summaries.weekly_summary",
    "month": "summaries.monthly_summary",
    "quarter": "summaries.quarterly_summary",
    "year": "summaries.yearly_summary",
}
PERIODS = tuple(SUMMARY_TABLES)

# summary column -> the SQP source column it sums
SUMMED = {
    "impressions": "ASIN Impression Count",
    "clicks": "ASIN Click Count",
    "cart_adds": "ASIN Cart Add Count",
    "purchases": "ASIN Purchase Count",
    "total_query_impressions": "Total Query Impression Count",
    "total_query_clicks": "Total Click Count",
    "total_query_cart_adds": "Total Cart Add Count",
    "total_query_purchases": "Total Purchase Count",
}
# ratio column -> (numerator, denominator), both period sums
RATIOS = {
    "ctr": ("clicks", "impressions"),
    "cart_add_rate": ("cart_adds", "clicks"),
    "cvr": ("purchases", "clicks"),
    "impression_share": ("impressions", "total_query_impressions"),
    "click_share": ("clicks", "total_query_clicks"),
    "cart_add_share": ("cart_adds", "total_query_cart_adds"),
    "purchase_share": ("purchases", "total_query_purchases"),
}
KEY = ("period_start", "search_query", "asin")
COMPARED = ("period_end", *SUMMED, *RATIOS, "active_weeks", "last_week_start")
SIX_PLACES = Decimal("0.000001")

# The restated week: the second week of a month, so that the month before it (and its quarter)
# lies wholly before the rebuilt periods.
RESTATED_WEEK = SPEC.first_week + timedelta(weeks=5)
RESTATED_ASIN_ZEROED = "B000000003"
RESTATED_ASIN_DROPPED = "B000000004"

Rows = dict[tuple[Any, ...], dict[str, Any]]


# --------------------------------------------------------------------------------------
# The independent computation
# --------------------------------------------------------------------------------------


def period_bounds(week: date, period: str) -> tuple[date, date]:
    """A week belongs to the month, quarter and year of its start date (SPEC.md)."""
    if period == "week":
        return week, week + timedelta(days=6)
    months = {"month": 1, "quarter": 3, "year": 12}[period]
    first_month = {"month": week.month, "quarter": (week.month - 1) // 3 * 3 + 1, "year": 1}[period]
    start = date(week.year, first_month, 1)
    after = first_month - 1 + months
    end = date(week.year + after // 12, after % 12 + 1, 1) - timedelta(days=1)
    return start, end


def ratio(numerator: int | None, denominator: int | None) -> Decimal | None:
    """numerator / denominator rounded to 6 places, half away from zero (Postgres round(numeric));
    NULL when the denominator is 0 or NULL. Counts are never negative, so half-up is the same."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    with localcontext() as ctx:
        ctx.prec = 60
        return (Decimal(numerator) / Decimal(denominator)).quantize(SIX_PLACES, rounding=ROUND_HALF_UP)


def read_source(clients: BigQueryClients) -> pa.Table:
    columns = ", ".join(f"`{src}` as {name}" for name, src in SUMMED.items())
    query = (
        f"select `Date` as week_start_at, `Search Query` as search_query, `ASIN` as asin, {columns} "
        f"from `{clients.project}.{clients.dataset}.{SQP_TABLE}`"
    )
    return clients.rest.query(query).to_arrow(create_bqstorage_client=False)


def expected_summary(source: pa.Table, period: str) -> Rows:
    weeks = [ts.astimezone(UTC).date() for ts in source["week_start_at"].to_pylist()]
    bounds = [period_bounds(w, period) for w in weeks]
    week_col = pa.array(weeks, pa.date32())
    table = (
        source.append_column("week_start", week_col)
        .append_column("period_start", pa.array([b[0] for b in bounds], pa.date32()))
        .append_column("period_end", pa.array([b[1] for b in bounds], pa.date32()))
        .append_column(
            "active_week",
            pc.if_else(pc.greater(source["impressions"], 0), week_col, pa.scalar(None, pa.date32())),
        )
    )
    grouped = table.group_by(["period_start", "period_end", "search_query", "asin"]).aggregate(
        [(c, "sum") for c in SUMMED] + [("active_week", "count_distinct"), ("week_start", "max")]
    )
    out: Rows = {}
    for g in grouped.to_pylist():
        row = {c: g[f"{c}_sum"] for c in SUMMED}
        row |= {c: ratio(row[num], row[den]) for c, (num, den) in RATIOS.items()}
        row |= {
            "period_end": g["period_end"],
            "active_weeks": g["active_week_count_distinct"],
            "last_week_start": g["week_start_max"],
        }
        out[(g["period_start"], g["search_query"], g["asin"])] = row
    return out


def actual_summary(pg: psycopg.Connection, period: str) -> Rows:
    cur = pg.execute(f"select {', '.join(KEY + COMPARED)} from {SUMMARY_TABLES[period]}")
    out: Rows = {}
    for values in cur.fetchall():
        row = dict(zip(KEY + COMPARED, values, strict=True))
        key = tuple(row.pop(k) for k in KEY)
        assert key not in out, f"{period}: duplicate key {key}"
        out[key] = row
    return out


def assert_summaries_match_source(pg: psycopg.Connection, clients: BigQueryClients) -> None:
    source = read_source(clients)
    for period in PERIODS:
        expected = expected_summary(source, period)
        actual = actual_summary(pg, period)
        missing = sorted(expected.keys() - actual.keys())[:5]
        extra = sorted(actual.keys() - expected.keys())[:5]
        assert not missing and not extra, f"{period}: missing rows {missing}, unexpected rows {extra}"
        wrong = [
            (key, col, exp[col], actual[key][col])
            for key, exp in sorted(expected.items())
            for col in COMPARED
            if actual[key][col] != exp[col]
        ]
        assert not wrong, (
            f"{period}: {len(wrong)} values differ, e.g. (key, column, expected, got): {wrong[:5]}"
        )
        for key, row in actual.items():
            for col in RATIOS:
                value = row[col]
                assert value is None or value.as_tuple().exponent == -6, f"{period} {key} {col}={value!r}"


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------


def test_period_bounds_follow_the_week_start() -> None:
    assert period_bounds(date(2026, 9, 27), "month") == (date(2026, 9, 1), date(2026, 9, 30))
    assert period_bounds(date(2026, 12, 27), "month") == (date(2026, 12, 1), date(2026, 12, 31))
    assert period_bounds(date(2026, 9, 27), "quarter") == (date(2026, 7, 1), date(2026, 9, 30))
    assert period_bounds(date(2026, 11, 22), "quarter") == (date(2026, 10, 1), date(2026, 12, 31))
    assert period_bounds(date(2024, 2, 25), "year") == (date(2024, 1, 1), date(2024, 12, 31))
    assert period_bounds(date(2026, 11, 22), "week") == (date(2026, 11, 22), date(2026, 11, 28))
    assert ratio(1, 8) == Decimal("0.125000")
    assert ratio(1, 3) == Decimal("0.333333") and ratio(2, 3) == Decimal("0.666667")
    assert ratio(1, 2_000_000) == Decimal("0.000001")  # 0.0000005 rounds half up, like Postgres
    assert ratio(5, 0) is None and ratio(None, 4) is None and ratio(4, None) is None


def test_summaries_equal_an_independent_computation(
    refreshed: dict[str, Any], pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    assert refreshed["status"] == "success", refreshed["message"]
    assert_summaries_match_source(pg, clients)


def summary_measures(settings: Settings) -> dict[str, Any]:
    """The summaries' one measure list (macros/summary_measures.sql), as dbt renders it."""
    res = invoke_plain_dbt(settings, ["compile", "--inline", "{{ tojson(summary_measures()) }}"], {})
    assert res.success, res.exception
    return json.loads(res.result.results[0].node.compiled_code)  # type: ignore[no-any-return]


def test_every_summary_exposes_exactly_the_measures_of_the_one_list(
    refreshed: dict[str, Any], pg: psycopg.Connection, settings: Settings
) -> None:
    measures = summary_measures(settings)
    counts = [name for name, _ in measures["counts"]]
    ratios = {name: (numerator, denominator) for name, numerator, denominator in measures["ratios"]}
    assert measures["summed"] == [*counts, "active_weeks"]
    # the list says what SPEC.md says, as this module's independent computation reads it
    assert counts == list(SUMMED) and ratios == RATIOS
    keys = ["period_start", "period_end", "search_query_key", "search_query", "asin"]
    lineage = ["active_weeks", "last_week_start", "_dbt_invocation_id"]
    for relation in SUMMARY_TABLES.values():
        schema, table = relation.split(".")
        columns = pg.execute(
            "select column_name from information_schema.columns "
            "where table_schema = %s and table_name = %s order by ordinal_position",
            (schema, table),
        ).fetchall()
        assert [c[0] for c in columns] == [*keys, *counts, *ratios, *lineage], relation
        for name, (numerator, denominator) in ratios.items():
            wrong = pg_scalar(
                pg,
                f"select count(*) from {relation} where {name} is distinct from "
                f"case when {denominator} <> 0 then round({numerator}::numeric / {denominator}, 6) end",
            )
            assert wrong == 0, f"{relation}.{name} is not {numerator} / {denominator}"


# --------------------------------------------------------------------------------------
# Restatement of an old week
# --------------------------------------------------------------------------------------


def _invocations(pg: psycopg.Connection, period: str) -> dict[tuple[Any, ...], str]:
    sql = f"select period_start, search_query, asin, _dbt_invocation_id from {SUMMARY_TABLES[period]}"
    return {r[:3]: r[3] for r in pg.execute(sql).fetchall()}


def first_rebuilt_period(refresh_start: date, period: str) -> date:
    """The first period an incremental run with var refresh_start_date rebuilds (docs/dbt.md):
    from the week containing the date (weeks start up to 6 days earlier), widened to its period."""
    return period_bounds(refresh_start - timedelta(days=6), period)[0]


def backfill_restated_week() -> dict[str, Any]:
    from flows.orchestration.daily_refresh import daily_refresh

    run: dict[str, Any] = daily_refresh(
        tables=[SQP_TABLE],
        start_date=RESTATED_WEEK,
        end_date=RESTATED_WEEK + timedelta(days=6),
        trigger="test",
    )
    assert run["status"] == "success", run["message"]
    return run


@dataclass(frozen=True)
class SourceWeek:
    """The SQP source table and one week of it, as BigQuery SQL."""

    clients: BigQueryClients
    table: str
    where: str

    def run(self, statement: str) -> None:
        self.clients.rest.query(statement).result()


@pytest.fixture
def restated_week(refreshed: dict[str, Any], clients: BigQueryClients) -> Iterator[SourceWeek]:
    """RESTATED_WEEK of the source, put back as generated (and backfilled again) afterwards.

    The copy lives outside the source dataset: the flow registers every new table it finds there.
    """
    dataset = f"{clients.project}.{clients.dataset}"
    week = SourceWeek(
        clients, f"`{dataset}.{SQP_TABLE}`", f"`Date` = timestamp '{RESTATED_WEEK} 00:00:00+00'"
    )
    backup_dataset = f"{clients.project}.restatement_backup_{uuid4().hex[:8]}"
    clients.rest.create_dataset(backup_dataset)
    backup = f"`{backup_dataset}.{SQP_TABLE}`"
    try:
        week.run(f"create table {backup} as select * from {week.table} where {week.where}")
        yield week
        week.run(f"delete from {week.table} where {week.where}")
        week.run(f"insert into {week.table} select * from {backup}")
        backfill_restated_week()
    finally:
        clients.rest.delete_dataset(backup_dataset, delete_contents=True)


def test_restated_week_rebuilds_its_periods_only(
    restated_week: SourceWeek, pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    week = restated_week
    assert RESTATED_WEEK.month == (RESTATED_WEEK - timedelta(days=6)).month  # see RESTATED_WEEK
    sqp_sql = "select week_start, max(_dbt_invocation_id) from marts.search_query_performance group by 1"
    before = {p: _invocations(pg, p) for p in PERIODS}
    before["sqp"] = {(w,): i for w, i in pg.execute(sqp_sql).fetchall()}

    # Late data: more impressions for every row of the week, one ASIN's clicks, cart adds and
    # purchases withdrawn, another ASIN's rows gone.
    week.run(
        f"update {week.table} set `ASIN Impression Count` = `ASIN Impression Count` + 1000, "
        f"`Total Query Impression Count` = `Total Query Impression Count` + 1000 where {week.where}"
    )
    week.run(
        f"update {week.table} set `ASIN Click Count` = 0, `ASIN Cart Add Count` = 0, "
        f"`ASIN Purchase Count` = 0 where {week.where} and `ASIN` = '{RESTATED_ASIN_ZEROED}'"
    )
    week.run(f"delete from {week.table} where {week.where} and `ASIN` = '{RESTATED_ASIN_DROPPED}'")

    new_invocation = backfill_restated_week()["dbt_invocation_id"]
    assert new_invocation

    assert_summaries_match_source(pg, clients)
    weekly = actual_summary(pg, "week")
    in_week = {k: row for k, row in weekly.items() if k[0] == RESTATED_WEEK}
    assert not [k for k in in_week if k[2] == RESTATED_ASIN_DROPPED]
    zeroed = [row for k, row in in_week.items() if k[2] == RESTATED_ASIN_ZEROED]
    assert zeroed and all(r["clicks"] == 0 and r["ctr"] == 0 and r["cvr"] is None for r in zeroed)

    after = {p: _invocations(pg, p) for p in PERIODS}
    after["sqp"] = {(w,): i for w, i in pg.execute(sqp_sql).fetchall()}
    for name in (*PERIODS, "sqp"):
        first = first_rebuilt_period(RESTATED_WEEK, "week" if name == "sqp" else name)
        kept_before = {k: v for k, v in before[name].items() if k[0] < first}
        kept_after = {k: v for k, v in after[name].items() if k[0] < first}
        rebuilt = {v for k, v in after[name].items() if k[0] >= first}
        assert rebuilt == {new_invocation}, f"{name}: periods from {first} were not all rebuilt"
        assert kept_after == kept_before, f"{name}: periods before {first} were rebuilt too"
        assert kept_after or name == "year", f"{name}: no period before {first} to check"


# --------------------------------------------------------------------------------------
# NULL counts (docs: sqp_null_counts in models/_sqp__docs.md)
# --------------------------------------------------------------------------------------

ASIN_SUMMED = {
    "impressions": "impressions",
    "clicks": "clicks",
    "cart_adds": "cart_adds",
    "purchases": "purchases",
}
ASIN_RATIOS = {
    "ctr": ("clicks", "impressions"),
    "cart_add_rate": ("cart_adds", "clicks"),
    "cvr": ("purchases", "clicks"),
}


def expected_asin_weeks(source: pa.Table) -> Rows:
    """asin_performance by the NULL rule: per week and ASIN, sums of the reported counts (NULL
    when no query reports one), ratios of those sums, every reported query counted."""
    weeks = [ts.astimezone(UTC).date() for ts in source["week_start_at"].to_pylist()]
    grouped = (
        source.append_column("week_start", pa.array(weeks, pa.date32()))
        .group_by(["week_start", "asin"])
        .aggregate([(c, "sum") for c in ASIN_SUMMED] + [("search_query", "count")])
    )
    out: Rows = {}
    for g in grouped.to_pylist():
        row: dict[str, Any] = {c: g[f"{c}_sum"] for c in ASIN_SUMMED}
        row |= {c: ratio(row[num], row[den]) for c, (num, den) in ASIN_RATIOS.items()}
        row["search_queries"] = g["search_query_count"]
        out[(g["week_start"], g["asin"])] = row
    return out


def actual_asin_weeks(pg: psycopg.Connection) -> Rows:
    columns = ("search_queries", *ASIN_SUMMED, *ASIN_RATIOS)
    cur = pg.execute(f"select start_date, asin, {', '.join(columns)} from marts.asin_performance")
    return {(r[0], r[1]): dict(zip(columns, r[2:], strict=True)) for r in cur.fetchall()}


def test_null_counts_build_every_model_and_follow_the_null_rule(
    restated_week: SourceWeek, pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    """Valid source rows with NULL counts in every stage: every model builds, the run ends
    `success`, and marts and summaries equal the documented NULL rule computed here."""
    from google.cloud import bigquery

    week = restated_week
    where = f"{week.where} and `ASIN` = @asin"

    def update(assignments: str, asin: str, extra: str = "", **params: str) -> None:
        query_params = [bigquery.ScalarQueryParameter("asin", "STRING", asin)] + [
            bigquery.ScalarQueryParameter(k, "STRING", v) for k, v in params.items()
        ]
        config = bigquery.QueryJobConfig(query_parameters=query_params)
        week.clients.rest.query(
            f"update {week.table} set {assignments} where {where}{extra}", job_config=config
        ).result()

    def queries(asin: str) -> list[str]:
        config = bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("asin", "STRING", asin)]
        )
        rows = week.clients.rest.query(
            f"select `Search Query` from {week.table} where {where} order by 1", job_config=config
        ).result()
        return [r[0] for r in rows]

    # B5: impressions reported by one query only (equal to its clicks), clicks by all: the
    # ASIN's week sums clicks above impressions, which is valid data.
    keep, *_ = queries("B000000005")
    update("`ASIN Impression Count` = null", "B000000005", " and `Search Query` != @keep", keep=keep)
    update(
        "`ASIN Impression Count` = `ASIN Click Count`", "B000000005", " and `Search Query` = @keep", keep=keep
    )
    # B6: no query reports clicks: the week's clicks and every rate from them are NULL.
    update("`ASIN Click Count` = null", "B000000006")
    # B7: cart adds and purchases missing for half the queries, query impressions for all.
    b7 = queries("B000000007")
    update(
        "`ASIN Cart Add Count` = null, `ASIN Purchase Count` = null",
        "B000000007",
        " and `Search Query` < @mid",
        mid=b7[len(b7) // 2],
    )
    update("`Total Query Impression Count` = null", "B000000007")
    # B8: one query with no count at all.
    update(
        "`ASIN Impression Count` = null, `ASIN Click Count` = null, `ASIN Cart Add Count` = null, "
        "`ASIN Purchase Count` = null, `Total Query Impression Count` = null, `Total Click Count` = null, "
        "`Total Cart Add Count` = null, `Total Purchase Count` = null",
        "B000000008",
        " and `Search Query` = @first",
        first=queries("B000000008")[0],
    )

    run = backfill_restated_week()  # asserts status success
    assert run["dbt_failed"] == [], run["dbt_failed"]
    nodes = dict(
        pg.execute(
            "select name, status from refresh_control.dbt_node_runs where invocation_id = %s and resource_type = 'model'",
            (run["dbt_invocation_id"],),
        ).fetchall()
    )
    assert set(nodes.values()) == {"success"}, nodes
    assert {
        "search_query_performance",
        "int_asin_weekly_funnel",
        "asin_performance",
        "weekly_summary",
    } <= set(nodes)

    source = read_source(clients)
    expected = expected_asin_weeks(source)
    b5 = expected[(RESTATED_WEEK, "B000000005")]
    assert b5["clicks"] > b5["impressions"], "the data must break funnel order on sums"
    b6 = expected[(RESTATED_WEEK, "B000000006")]
    assert b6["clicks"] is None and b6["ctr"] is None and b6["impressions"] is not None
    actual = actual_asin_weeks(pg)
    assert actual.keys() == expected.keys()
    wrong = [
        (k, c, e[c], actual[k][c]) for k, e in sorted(expected.items()) for c in e if actual[k][c] != e[c]
    ]
    assert not wrong, f"asin_performance: {len(wrong)} values differ, e.g. {wrong[:5]}"
    assert_summaries_match_source(pg, clients)
    weekly = actual_summary(pg, "week")
    b8 = [
        r
        for k, r in weekly.items()
        if k[0] == RESTATED_WEEK and k[2] == "B000000008" and r["impressions"] is None
    ]
    assert len(b8) == 1 and b8[0]["active_weeks"] == 0 and b8[0]["ctr"] is None


# --------------------------------------------------------------------------------------
# Search queries of any length (key: search_query_key, docs/dbt.md)
# --------------------------------------------------------------------------------------


def long_queries() -> dict[str, str]:
    """Two ~10 KB queries that do not compress (a btree entry holds ~2.7 KB after compression):
    ASCII, and multibyte unicode (3- and 4-byte UTF-8)."""
    rng = random.Random(8)
    ascii_text = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(10_000))
    alphabet = "跑步鞋ランニングシューズкроссовкиé🏃👟🎽" + "".join(chr(0x4E00 + i) for i in range(200))
    unicode_text = "".join(rng.choice(alphabet) for _ in range(3_000))
    assert len(unicode_text.encode()) > 8_000
    return {"ascii": "pasted " + ascii_text, "unicode": "跑步 " + unicode_text}


def test_long_search_queries_reach_every_model_with_their_full_text(
    restated_week: SourceWeek, pg: psycopg.Connection, clients: BigQueryClients
) -> None:
    from google.cloud import bigquery

    from flows.demo.sample_data import sqp_schema

    week = restated_week
    queries = long_queries()
    names = [f"`{f.name}`" for f in sqp_schema()]
    copied = ", ".join("@query" if n == "`Search Query`" else n for n in names)
    for asin, text in zip(("B000000009", "B000000010"), queries.values(), strict=True):
        config = bigquery.QueryJobConfig(
            query_parameters=[
                bigquery.ScalarQueryParameter("query", "STRING", text),
                bigquery.ScalarQueryParameter("asin", "STRING", asin),
            ]
        )
        # A copy of one of the ASIN's rows in the week, under the long query.
        week.clients.rest.query(
            f"insert into {week.table} ({', '.join(names)}) select {copied} from {week.table} "
            f"where {week.where} and `ASIN` = @asin order by `Search Query` limit 1",
            job_config=config,
        ).result()

    run = backfill_restated_week()  # asserts status success
    assert run["dbt_failed"] == [], run["dbt_failed"]

    models = {
        "marts.search_query_performance": "week_start",
        "marts.search_performance_summary": "week_start",
        **{table: "period_start" for table in SUMMARY_TABLES.values()},
    }
    for text in queries.values():
        key = hashlib.md5(text.encode()).hexdigest()
        for table, period_column in models.items():
            rows = pg.execute(
                f"select {period_column}, search_query, search_query_key from {table} where search_query_key = %s",
                (key,),
            ).fetchall()
            assert len(rows) == 1, f"{table}: {len(rows)} rows for the {len(text)}-character query"
            period, stored, stored_key = rows[0]
            assert stored == text and stored_key == key, table
            assert period <= RESTATED_WEEK, table
    assert_summaries_match_source(pg, clients)


# --------------------------------------------------------------------------------------
# dbt run auditing
# --------------------------------------------------------------------------------------


def test_node_runs_are_recorded_and_linked(refreshed: dict[str, Any], pg: psycopg.Connection) -> None:
    run_id = refreshed["run_id"]
    inv = refreshed["dbt_invocation_id"]
    link = pg.execute(
        """
        select i.run_id::text, i.flow_run_id, r.flow_run_id, r.dbt_invocation_id, i.success, i.nodes_total,
               i.nodes_failed, i.started_at <= i.finished_at, i.command,
               (select count(*) from refresh_control.dbt_node_runs n where n.invocation_id = i.invocation_id)
        from refresh_control.dbt_invocations i
        join refresh_control.refresh_runs r on r.run_id = i.run_id
        where i.invocation_id = %s""",
        (inv,),
    ).fetchone()
    assert link is not None, "no dbt_invocations row for the run's invocation"
    i_run, i_flow, r_flow, r_inv, success, total, failed, ordered, command, node_rows = link
    assert i_run == run_id and r_inv == inv
    assert i_flow is not None and i_flow == r_flow
    assert success and failed == 0 and ordered and command == "build"
    assert total == node_rows == refreshed["dbt_nodes"] > 10

    nodes = {
        r[0]: r[1:]
        for r in pg.execute(
            """select unique_id, resource_type, name, status, relation, started_at, finished_at,
                      execution_time_s, rows_affected, failures
               from refresh_control.dbt_node_runs where invocation_id = %s""",
            (inv,),
        ).fetchall()
    }
    for uid, (rtype, name, status, relation, started, finished, seconds, rows, failures) in nodes.items():
        assert started is not None and finished is not None and started <= finished, uid
        assert seconds is not None and seconds >= 0, uid
        if rtype == "model":
            assert status == "success" and relation and name == uid.rsplit(".", 1)[-1], uid
        elif rtype == "test":
            assert status in ("pass", "warn"), uid
            assert rows is None and failures is not None and relation is None, uid
        else:
            assert rtype == "exposure" and status in ("success", "no-op"), uid

    # Postgres reports the rows a table or incremental model wrote ("SELECT n" when created,
    # "INSERT 0 n" when incremental), nothing for a view.
    messages = dict(
        pg.execute(
            "select name, message from refresh_control.dbt_node_runs where invocation_id = %s and resource_type = 'model'",
            (inv,),
        ).fetchall()
    )
    for uid, (rtype, name, *_rest, rows, _failures) in nodes.items():
        if rtype == "model" and messages[name] == "CREATE VIEW":
            assert rows is None, uid
        elif rtype == "model":
            assert rows is not None and rows > 0 and messages[name].endswith(f" {rows}"), (
                uid,
                messages[name],
            )
    sqp = nodes["model.sqp_refresh.search_query_performance"]
    assert sqp[3] == '"postgres"."marts"."search_query_performance"'
    assert 0 < sqp[7] <= SPEC.sqp_rows

    # One query joins the extract, dbt and the run.
    joined = pg_scalar(
        pg,
        """select count(*) from refresh_control.refresh_runs r
           join refresh_control.table_refreshes t on t.run_id = r.run_id
           join refresh_control.dbt_invocations i on i.run_id = r.run_id
           join refresh_control.dbt_node_runs n on n.invocation_id = i.invocation_id
           where r.run_id = %s and t.table_name = %s and n.name = 'search_query_performance'""",
        (run_id, SQP_TABLE),
    )
    assert joined == 1


def test_thousands_of_node_runs_are_written_in_one_batch(settings: Settings, pg: psycopg.Connection) -> None:
    migrate(settings)
    schema = settings.control_schema
    invocation = f"synthetic-{uuid4()}"
    now = datetime.now(UTC)
    nodes = [
        NodeRun(
            unique_id=f"model.sqp_refresh.m{i}" if i % 2 else f"test.sqp_refresh.t{i}.{i:010x}",
            resource_type="model" if i % 2 else "test",
            name=f"m{i}" if i % 2 else f"t{i}",
            relation=f'"postgres"."marts"."m{i}"' if i % 2 else None,
            status="success" if i % 2 else ("fail" if i % 500 == 0 else "pass"),
            started_at=now,
            finished_at=now + timedelta(seconds=1),
            execution_time_s=1.0 + i / 1000,
            rows_affected=i if i % 2 else None,
            message="a message with a NUL \x00 byte" if i == 7 else None,
            failures=None if i % 2 else i % 3,
        )
        for i in range(5000)
    ]
    outcome = DbtOutcome(invocation, False, "build", ["build", "--select", "x+"], nodes, "10 nodes failed")
    try:
        started = time.perf_counter()
        record_dbt(pg, schema, outcome, None, uuid4(), now, now + timedelta(minutes=3))
        elapsed = time.perf_counter() - started
        assert elapsed < 3.0, f"recording 5,000 node runs took {elapsed:.2f}s"
        record_dbt(pg, schema, outcome, None, None, now, now)  # already recorded: left as it is
        row = pg.execute(
            f"""select i.nodes_total, i.nodes_failed, count(n.*), sum(n.rows_affected), count(n.failures),
                       max(n.message)
                from {schema}.dbt_invocations i join {schema}.dbt_node_runs n using (invocation_id)
                where i.invocation_id = %s group by 1, 2""",
            (invocation,),
        ).fetchone()
        assert row == (5000, 10, 5000, sum(range(1, 5000, 2)), 2500, "a message with a NUL  byte")
    finally:
        pg.execute(f"delete from {schema}.dbt_node_runs where invocation_id = %s", (invocation,))
        pg.execute(f"delete from {schema}.dbt_invocations where invocation_id = %s", (invocation,))


# --------------------------------------------------------------------------------------
# Docs
# --------------------------------------------------------------------------------------


def test_docs_generate_describes_every_source_model_and_column(
    refreshed: dict[str, Any], settings: Settings
) -> None:
    from scripts.check_dbt_docs import undocumented

    outcome = run_dbt(settings, ["docs", "generate"])
    target = target_dir(settings)
    assert (target / "index.html").exists() and (target / "catalog.json").exists(), outcome.message
    manifest = json.loads((target / "manifest.json").read_text())
    catalog = json.loads((target / "catalog.json").read_text())
    assert undocumented(manifest, catalog) == []

    # The check is not vacuous: an undescribed column, a stale one and a missing model show up.
    uid = "model.sqp_refresh.weekly_summary"
    manifest["nodes"][uid]["columns"]["ctr"]["description"] = ""
    manifest["nodes"][uid]["columns"]["gone"] = {"name": "gone", "description": "x"}
    del catalog["nodes"]["model.sqp_refresh.monthly_summary"]
    assert sorted(undocumented(manifest, catalog)) == [
        "model.sqp_refresh.monthly_summary: not in catalog.json (not built?)",
        f"{uid}: column ctr has no description",
        f"{uid}: documented column gone does not exist",
    ]
