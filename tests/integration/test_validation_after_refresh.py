"""Validation as a step of every live refresh: exactly the periods a run committed.

The session's daily refresh (the `refreshed` fixture, a real flow run) is checked first; the rest
runs in its own dataset, raw and control schemas (`va_*`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from flows.control import fingerprints, registry
from flows.core.db import migrate
from flows.core.planning import align
from flows.core.settings import Settings, get_settings
from flows.core.table_config import ChangeDetection, SliceSize, TableConfig
from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
from flows.engine import change_detection
from flows.engine.bigquery import BigQueryClients, make_clients
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.engine.validation import source_match
from flows.orchestration import post_load_checks, run_summary
from tests.integration.test_extraction_engine import locked_run


def _dq(conn: psycopg.Connection, schema: str, run_id: str | UUID) -> list[tuple[str, date, str]]:
    rows = conn.execute(
        f"select table_name, period_start, status from {schema}.dq_results "
        "where run_id = %s and check_name = 'source_match' order by 1, 2",
        (run_id,),
    ).fetchall()
    return [(t, p.astimezone(UTC).date() if p else None, s) for t, p, s in rows]


def test_a_real_refresh_records_a_pass_for_each_period_it_loaded(
    refreshed: Any, settings: Settings, pg: psycopg.Connection
) -> None:
    summary = refreshed
    assert summary["status"] == "success", summary["message"]
    checks = {v["table"]: v for v in summary["validation"]}
    assert set(checks) == {"search_query_performance", "daily_search_terms", "products"}
    assert all(v["failed"] == [] and v["error"] is None and v["periods"] > 0 for v in checks.values())
    rows = _dq(pg, settings.control_schema, summary["run_id"])
    assert {s for _, _, s in rows} == {"pass"}
    # One row per committed slice of the run, no more.
    slices = pg.execute(
        f"select table_name, count(*) from {settings.control_schema}.slice_refreshes "
        "where run_id = %s and status = 'success' group by 1",
        (summary["run_id"],),
    ).fetchall()
    per_table: dict[str, int] = {}
    for t, _, _ in rows:
        per_table[t] = per_table.get(t, 0) + 1
    assert per_table == dict(slices)
    assert per_table == {t: v["periods"] for t, v in checks.items()}


@dataclass
class Env:
    settings: Settings
    clients: BigQueryClients

    def pg(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.dsn(), autocommit=True)

    def refresh(self, cfg: TableConfig, options: RefreshOptions) -> tuple[UUID, TableOutcome]:
        with self.pg() as conn:
            registry.sync_from_file(conn, self.settings.control_schema, [cfg])
        with locked_run(self.settings) as run_id:
            outcome = refresh_table(self.settings, self.clients, cfg, run_id, options)
        assert outcome.status == "success", outcome.error
        return run_id, outcome


@pytest.fixture(scope="module")
def env(stack: object) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    mp.setenv("REFRESH_BQ_DATASET", "va_source")
    mp.setenv("REFRESH_RAW_SCHEMA", "va_raw")
    mp.setenv("REFRESH_CONTROL_SCHEMA", "va_control")
    settings = get_settings()
    migrate(settings)
    clients = make_clients(settings)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        conn.execute("drop schema if exists va_raw cascade")
        conn.execute("truncate va_control.checkpoints, va_control.dq_results, va_control.events cascade")
    generate(clients, SampleSpec(sqp_rows=3_000, weeks=8, asins=10, daily_rows=0))
    try:
        yield Env(settings, clients)
    finally:
        clients.close()
        mp.undo()


def _cfg(mode: str = "live", **custom: Any) -> TableConfig:
    return TableConfig(
        mode=mode,
        table_name="search_query_performance",
        source_table=SQP_TABLE,
        cursor_column="Date",
        slice_size="week",
        lookback_days=14,
        custom_params={"key_columns": ["Date", "ASIN", "Search Query"], **custom},
    )


def test_a_difference_loaded_by_a_refresh_is_caught_in_that_run(env: Env) -> None:
    # The source does not change here: only with change detection off does the next refresh
    # re-read (and so re-load through the tampering trigger) the lookback window.
    cfg = _cfg().model_copy(update={"change_detection": ChangeDetection.OFF})
    run_id, _ = env.refresh(cfg, RefreshOptions(full_refresh=True))
    first = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [cfg], [_ok(cfg)], run_id, False
    )
    assert first[0].failed == [] and first[0].periods >= 8 and first[0].error is None
    with env.pg() as conn:
        loaded = _dq(conn, "va_control", run_id)
        assert len(loaded) == first[0].periods and {s for *_, s in loaded} == {"pass"}
        old_week = min(p for _, p, _ in loaded)
        # Outside the lookback window: the next refresh does not touch (nor validate) it.
        conn.execute(
            "update va_raw.search_query_performance set asin_click_count = asin_click_count + 1 "
            "where ctid = (select ctid from va_raw.search_query_performance "
            "where (date at time zone 'UTC')::date >= %s order by date, asin, search_query limit 1)",
            (old_week,),
        )
        # Inside it: a loader that alters one row on its way in (a stand-in for a conversion bug)
        # is what the step exists to catch. A real trigger on the real COPY of the next refresh.
        row = conn.execute(
            "select date, asin, search_query from va_raw.search_query_performance "
            "order by date desc, asin, search_query limit 1"
        ).fetchone()
        assert row is not None
        conn.execute(
            sql.SQL(
                "create function va_raw.tamper() returns trigger language plpgsql as $$ begin "
                "if new.date = {} and new.asin = {} and new.search_query = {} then "
                "new.asin_click_count := new.asin_click_count + 7; end if; return new; end $$"
            ).format(*(sql.Literal(v) for v in row))
        )
        conn.execute(
            "create trigger tamper before insert on va_raw.search_query_performance "
            "for each row execute function va_raw.tamper()"
        )
    try:
        run_id, outcome = env.refresh(cfg, RefreshOptions())
    finally:
        with env.pg() as conn:
            conn.execute("drop trigger tamper on va_raw.search_query_performance")
    checks = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [cfg], [outcome], run_id, False
    )
    newest_week = max(p for _, p, _ in loaded)
    assert checks[0].failed == [str(newest_week)], checks
    assert 0 < checks[0].periods < first[0].periods
    with env.pg() as conn:
        rows = _dq(conn, "va_control", run_id)
        assert old_week not in {p for _, p, _ in rows}
        assert [(p, s) for _, p, s in rows if s == "fail"] == [(newest_week, "fail")]
        details = conn.execute(
            "select details from va_control.dq_results where run_id = %s and status = 'fail'", (run_id,)
        ).fetchone()
        assert details is not None
        assert [d["columns"] for d in details[0]["different"]] == [["asin_click_count"]]
        event = conn.execute(
            "select table_name, payload from va_control.events where event = 'validation.failed' "
            "and run_id = %s",
            (run_id,),
        ).fetchall()
        assert event == [("search_query_performance", event[0][1])]
        assert event[0][1]["periods_failed"] == [str(newest_week)]
    status, message = run_summary.with_validation("success", "1 table(s) refreshed", checks)
    assert status == "warning"
    assert f"search_query_performance differs from BigQuery in {newest_week}" in message
    # validate-data (all periods) still finds the row changed outside the window.
    whole = source_match.validate(env.settings, env.clients, ["search_query_performance"])
    assert {r.period_start for r in whole["search_query_performance"] if not r.passed} == {
        old_week,
        newest_week,
    }


def _postgres_from(conn: psycopg.Connection, run_id: UUID) -> set[str | None]:
    rows = conn.execute(
        "select details->>'postgres_from' from va_control.dq_results where run_id = %s", (run_id,)
    ).fetchall()
    return {r[0] for r in rows}


def test_untouched_slices_reuse_the_load_fingerprint_and_any_change_since_is_found(env: Env) -> None:
    # Change detection on: each load stores Postgres' fingerprint of what it committed.
    cfg = _cfg()
    run_id, outcome = env.refresh(cfg, RefreshOptions(full_refresh=True))
    (check,) = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [cfg], [outcome], run_id, False
    )
    assert check.failed == [] and check.periods >= 8
    assert check.periods_from_load == check.periods  # no row was hashed in Postgres
    with env.pg() as conn:
        assert _postgres_from(conn, run_id) == {"load fingerprint, rows unchanged since the load"}

    # After the load, before its validation: a row deleted (the count falls short of the
    # load's), then in another run a value changed (the row version is another transaction's).
    # Each is found, from a fresh checksum.
    tampers = [
        "delete from va_raw.search_query_performance where ctid = ({row})",
        "update va_raw.search_query_performance set asin_click_count = asin_click_count + 1 "
        "where ctid = ({row})",
    ]
    for tamper in tampers:
        run_id, outcome = env.refresh(cfg, RefreshOptions(full_refresh=True))
        with env.pg() as conn:
            week = conn.execute(
                "select (max(date) at time zone 'UTC')::date from va_raw.search_query_performance"
            ).fetchone()
            assert week is not None
            conn.execute(
                tamper.format(
                    row="select ctid from va_raw.search_query_performance "
                    "order by date desc, asin, search_query limit 1"
                )
            )
        (check,) = post_load_checks.validate_after_refresh(
            env.settings, env.clients, [cfg], [outcome], run_id, False
        )
        assert check.failed == [str(align(week[0], cfg.slice_size))], tamper
        assert check.periods_from_load == 0
        with env.pg() as conn:
            details = conn.execute(
                "select details from va_control.dq_results where run_id = %s and status = 'fail'", (run_id,)
            ).fetchone()
            assert details is not None and "postgres_from" not in details[0]
            found = details[0]["missing_in_postgres"] + details[0]["different"]
            assert len(found) == 1, details[0]
    # Leave the table as loaded for the tests after this one.
    env.refresh(cfg, RefreshOptions(full_refresh=True))


def test_a_source_change_after_the_load_is_reported_from_a_fresh_checksum(env: Env) -> None:
    cfg = _cfg()
    run_id, outcome = env.refresh(cfg, RefreshOptions(full_refresh=True))
    path = f"`{env.clients.project}.va_source.{SQP_TABLE}`"
    newest = f"(select max(`Date`) from {path})"
    change = "`ASIN Click Count` = `ASIN Click Count` + {d} where `Date` = " + newest
    env.clients.rest.query(f"update {path} set {change.format(d=1)}").result()
    try:
        (check,) = post_load_checks.validate_after_refresh(
            env.settings, env.clients, [cfg], [outcome], run_id, False
        )
    finally:
        env.clients.rest.query(f"update {path} set {change.format(d=-1)}").result()
    assert len(check.failed) == 1 and check.periods_from_load == 0
    with env.pg() as conn:
        details = conn.execute(
            "select details from va_control.dq_results where run_id = %s and status = 'fail'", (run_id,)
        ).fetchone()
    assert details is not None and "postgres_from" not in details[0]
    assert {tuple(d["columns"]) for d in details[0]["different"]} == {("asin_click_count",)}


def _ok(cfg: TableConfig) -> TableOutcome:
    return TableOutcome(cfg.table_name, "success", cfg.mode.value)


def test_opted_out_unchanged_and_dry_run_tables_are_not_validated(env: Env) -> None:
    with locked_run(env.settings) as run_id:
        pass
    cfg = _cfg()
    (unchanged,) = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [cfg], [_ok(cfg)], run_id, False
    )
    assert unchanged.skipped == "no slice committed (unchanged)"
    opted = _cfg(validate_after_refresh=False)
    (off,) = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [opted], [_ok(opted)], run_id, False
    )
    assert off.skipped == "custom_params.validate_after_refresh is false"
    (dry,) = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [cfg], [_ok(cfg)], run_id, True
    )
    assert dry.skipped is not None and "not live" in dry.skipped
    shadow = _cfg("shadow")
    (sh,) = post_load_checks.validate_after_refresh(
        env.settings, env.clients, [shadow], [_ok(shadow)], run_id, False
    )
    assert sh.skipped == "mode shadow: not live"
    with env.pg() as conn:
        assert _dq(conn, "va_control", run_id) == []


# --- BigQuery's side from change detection's fingerprints (the run's plan) --------------------


def _weeks(env: Env) -> list[date]:
    """The source's weekly periods (slice starts)."""
    path = f"`{env.clients.project}.va_source.{SQP_TABLE}`"
    rows = env.clients.rest.query(f"select distinct `Date` from {path}").result()
    return sorted({align(r[0].astimezone(UTC).date(), SliceSize.WEEK) for r in rows})


def _bump(env: Env, week: date, by: int) -> None:
    """A restatement in the source: every click count of the period moved by `by`."""
    path = f"`{env.clients.project}.va_source.{SQP_TABLE}`"
    env.clients.rest.query(
        f"update {path} set `ASIN Click Count` = `ASIN Click Count` + {by} "
        f"where `Date` >= timestamp('{week.isoformat()}') "
        f"and `Date` < timestamp('{(week + timedelta(days=7)).isoformat()}')"
    ).result()


@contextmanager
def _checksum_queries(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The BigQuery checksum queries (row hashes) sent while inside; the real queries still run."""
    sent: list[str] = []
    real = env.clients.rest.query

    def query(q: str, *args: Any, **kwargs: Any) -> Any:
        if "md5(" in q:
            sent.append(q)
        return real(q, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(env.clients.rest, "query", query)
        yield sent


def _details(conn: psycopg.Connection, run_id: UUID) -> dict[date, dict[str, Any]]:
    rows = conn.execute(
        "select period_start, details from va_control.dq_results where run_id = %s", (run_id,)
    ).fetchall()
    return {p.astimezone(UTC).date(): d for p, d in rows}


def test_a_daily_run_validates_with_the_plans_bigquery_fingerprints(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg()
    env.refresh(cfg, RefreshOptions(full_refresh=True))
    *_, before, newest = _weeks(env)
    # A restated week, and a new one (its checkpoint gone): one read because it changed, the
    # other because there is nothing to compare it with. Both fingerprinted by the plan.
    _bump(env, before, 1)
    with env.pg() as conn:
        conn.execute(
            "delete from va_control.checkpoints where table_name = %s and slice_start = %s",
            (cfg.table_name, datetime.combine(newest, time(), UTC)),
        )
    try:
        run_id, outcome = env.refresh(cfg, RefreshOptions())
        with _checksum_queries(env, monkeypatch) as sent:
            (check,) = post_load_checks.validate_after_refresh(
                env.settings, env.clients, [cfg], [outcome], run_id, False
            )
        assert sent == [] and check.bytes_processed == 0
        assert check.failed == [] and check.error is None, check
        assert check.periods == check.periods_from_load == check.periods_bigquery_from_plan == 2
        with env.pg() as conn:
            details = _details(conn, run_id)
        assert set(details) == {before, newest}
        assert all(d["bigquery_from_plan"] is True and d["bigquery_as_of"] for d in details.values())

        # A period the plan did not fingerprint (as one committed by an earlier attempt of the
        # table in the same run): BigQuery is asked for that period alone.
        plan = outcome.plan_fingerprints
        assert plan is not None
        outcome.plan_fingerprints = replace(plan, periods={newest: plan.periods[newest]})
        with _checksum_queries(env, monkeypatch) as sent:
            (check,) = post_load_checks.validate_after_refresh(
                env.settings, env.clients, [cfg], [outcome], run_id, False
            )
        assert check.failed == [] and check.periods_bigquery_from_plan == 1, check
        assert len(sent) == 1
        assert f">= TIMESTAMP '{before}" in sent[0] and f"< TIMESTAMP '{newest}" in sent[0]  # one week
        with env.pg() as conn:
            assert "bigquery_from_plan" not in _details(conn, run_id)[before]
    finally:
        _bump(env, before, -1)
        env.refresh(cfg, RefreshOptions(full_refresh=True))


def test_a_table_not_validated_after_its_refresh_fingerprints_only_what_it_compares(env: Env) -> None:
    cfg = _cfg(validate_after_refresh=False)
    env.refresh(cfg, RefreshOptions(full_refresh=True))
    *_, before, newest = _weeks(env)
    _bump(env, before, 1)
    with env.pg() as conn:
        conn.execute(
            "delete from va_control.checkpoints where table_name = %s and slice_start = %s",
            (cfg.table_name, datetime.combine(newest, time(), UTC)),
        )
    try:
        _, outcome = env.refresh(cfg, RefreshOptions())
        assert outcome.slices_done == 2
        assert outcome.plan_fingerprints is not None and set(outcome.plan_fingerprints.periods) == {before}
    finally:
        _bump(env, before, -1)
        env.refresh(cfg, RefreshOptions(full_refresh=True))


def test_a_plan_fingerprint_that_differs_from_postgres_is_reported(env: Env) -> None:
    # The plan's figure decides BigQuery's side: one altered by a unit is a difference. Bisection
    # then compares with BigQuery as it is now and finds no row: the case of a source changed
    # after the plan's fingerprint, and what the result says about it.
    cfg = _cfg()
    env.refresh(cfg, RefreshOptions(full_refresh=True))
    week = _weeks(env)[-1]
    _bump(env, week, 1)
    try:
        run_id, outcome = env.refresh(cfg, RefreshOptions())
        plan = outcome.plan_fingerprints
        assert plan is not None and set(plan.periods) == {week}
        fp = plan.periods[week]
        outcome.plan_fingerprints = replace(
            plan, periods={week: fingerprints.Fingerprint(fp.rows, fp.checksum + 1)}
        )
        (check,) = post_load_checks.validate_after_refresh(
            env.settings, env.clients, [cfg], [outcome], run_id, False
        )
        assert check.failed == [str(week)] and check.periods_bigquery_from_plan == 1, check
        with env.pg() as conn:
            details = _details(conn, run_id)[week]
        assert details["bigquery_from_plan"] is True
        assert details["missing_in_postgres"] == details["extra_in_postgres"] == details["different"] == []
        assert "the source changed after the plan's fingerprint" in details["note"]
    finally:
        _bump(env, week, -1)
        env.refresh(cfg, RefreshOptions(full_refresh=True))


def test_postgres_changed_after_the_load_differs_from_the_plans_fingerprint(env: Env) -> None:
    cfg = _cfg()
    env.refresh(cfg, RefreshOptions(full_refresh=True))
    week = _weeks(env)[-1]
    _bump(env, week, 1)
    try:
        run_id, outcome = env.refresh(cfg, RefreshOptions())
        with env.pg() as conn:  # between the load and its validation
            conn.execute(
                "update va_raw.search_query_performance set asin_purchase_count = asin_purchase_count + 1 "
                "where ctid = (select ctid from va_raw.search_query_performance "
                "order by date desc, asin, search_query limit 1)"
            )
        (check,) = post_load_checks.validate_after_refresh(
            env.settings, env.clients, [cfg], [outcome], run_id, False
        )
        assert check.failed == [str(week)] and check.periods_from_load == 0, check
        assert check.periods_bigquery_from_plan == 1
        with env.pg() as conn:
            details = _details(conn, run_id)[week]
        assert details["bigquery_from_plan"] is True and "note" not in details
        assert [d["columns"] for d in details["different"]] == [["asin_purchase_count"]]
    finally:
        _bump(env, week, -1)
        env.refresh(cfg, RefreshOptions(full_refresh=True))


def test_a_source_changed_between_the_plan_and_the_read_is_reported(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg()
    env.refresh(cfg, RefreshOptions(full_refresh=True))
    week = _weeks(env)[-1]
    _bump(env, week, 1)
    real = change_detection.detect

    def detect_then_restate(*args: Any, **kwargs: Any) -> change_detection.Detection:
        det = real(*args, **kwargs)
        _bump(env, week, 1)  # after the fingerprint, before the read
        return det

    try:
        with monkeypatch.context() as m:
            m.setattr(change_detection, "detect", detect_then_restate)
            run_id, outcome = env.refresh(cfg, RefreshOptions())
        (check,) = post_load_checks.validate_after_refresh(
            env.settings, env.clients, [cfg], [outcome], run_id, False
        )
        # Postgres holds what the read saw, not what BigQuery held at the fingerprint: a difference.
        assert check.failed == [str(week)] and check.periods_bigquery_from_plan == 1, check
        with env.pg() as conn:
            details = _details(conn, run_id)[week]
        assert "the source changed after the plan's fingerprint" in details["note"]
        # A fresh validation compares with BigQuery now, which the read saw: they agree.
        fresh = source_match.validate(env.settings, env.clients, [cfg.table_name], week, week)
        assert [r.passed for r in fresh[cfg.table_name]] == [True]
        # The next daily run finds the source equal to what was loaded: nothing to read.
        _, again = env.refresh(cfg, RefreshOptions())
        assert again.slices_done == 0 and again.plan_fingerprints is None
    finally:
        _bump(env, week, -2)
        env.refresh(cfg, RefreshOptions(full_refresh=True))
