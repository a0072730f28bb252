"""dbt rebuilds only the periods of the days a run changed (var refresh_days), and the result
equals a full rebuild.

On the session's data: one old week is restated, one ASIN's rows vanish from another week of
the same month, and a new week arrives. Those three weeks are loaded by the real loader (the
slices a change-aware daily run applies; every other slice unchanged), then dbt is built with
the args the flow computes from the outcomes. Exactly the expected weeks, months, quarters and
years carry the new dbt invocation; every incremental model and summary equals a
`--full-refresh` build into `<schema>_cmp` (EXCEPT both ways). The source, the raw table and
the models are put back afterwards.

A week of SQP rows (and a day of the daily table) withdrawn whole at the source leaves every
model with the next normal daily run, and its month, quarter and year are recomputed: the
models equal a full rebuild of the same source.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from flows.control import rebuilds, registry
from flows.core.settings import Settings
from flows.demo.sample_data import DAILY_TABLE, PRODUCTS_TABLE, SQP_TABLE
from flows.engine.bigquery import BigQueryClients
from flows.engine.periods import periods_to_rebuild
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.engine.transform import run_dbt, target_dir
from flows.orchestration import dbt_selection
from flows.orchestration.explain import explain
from flows.orchestration.run_params import RunParams
from tests.integration.conftest import SPEC
from tests.integration.test_extraction_engine import locked_run

# SQP weeks start on Sunday (the sample's last week is Sunday 2026-11-22). All changed weeks
# lie in October and November: September, Q3 and the weeks not named here must be kept.
RESTATED = date(2026, 10, 11)
SHRUNK = date(2026, 10, 18)
NEW = SPEC.last_week + timedelta(weeks=1)
DROPPED_ASIN = "B000000004"
CMP = "_cmp"

# model -> its period column; the incremental models and the summaries
MODELS = {
    "marts.search_query_performance": "week_start",
    "marts.search_performance_summary": "week_start",
    "intermediate.int_asin_weekly_funnel": "week_start",
    "summaries.weekly_summary": "period_start",
    "summaries.monthly_summary": "period_start",
    "summaries.quarterly_summary": "period_start",
    "summaries.yearly_summary": "period_start",
}
SQP_BUILD = ["--select", "source:sqp+", "--exclude", "source:refresh_control+"]


def _week_where(week: date) -> str:
    return f"`Date` = timestamp '{week} 00:00:00+00'"


def _load(settings: Settings, clients: BigQueryClients, weeks: list[date]) -> list[TableOutcome]:
    """The given SQP weeks through the real loader, one slice each (as a run whose other
    slices were unchanged applies them)."""
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        cfg = registry.get(conn, settings.control_schema, SQP_TABLE)
    outcomes = []
    with locked_run(settings) as run_id:
        for week in weeks:
            outcome = refresh_table(
                settings, clients, cfg, run_id, RefreshOptions(start_date=week, end_date=week)
            )
            assert outcome.status == "success", outcome.error
            outcomes.append(outcome)
    return outcomes


@pytest.fixture
def changed_source(refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients) -> Iterator[None]:
    """RESTATED and SHRUNK changed and NEW added in the source; all put back afterwards (source,
    raw table, checkpoints, models rebuilt in full)."""
    assert refreshed["status"] == "success", refreshed["message"]
    table = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"
    backup_dataset = f"{clients.project}.changed_periods_{uuid4().hex[:8]}"
    clients.rest.create_dataset(backup_dataset)
    backup = f"`{backup_dataset}.{SQP_TABLE}`"

    def run(statement: str) -> None:
        clients.rest.query(statement).result()

    old_weeks = f"({_week_where(RESTATED)} or {_week_where(SHRUNK)})"
    try:
        run(f"create table {backup} as select * from {table} where {old_weeks}")
        run(
            f"update {table} set `ASIN Impression Count` = `ASIN Impression Count` + 1000, "
            f"`ASIN Click Count` = `ASIN Click Count` + 7 where {_week_where(RESTATED)}"
        )
        run(f"delete from {table} where {_week_where(SHRUNK)} and `ASIN` = '{DROPPED_ASIN}'")
        run(
            f"insert into {table} select * replace (timestamp_add(`Date`, interval 7 day) as `Date`) "
            f"from {table} where {_week_where(SPEC.last_week)}"
        )
        yield
    finally:
        run(f"delete from {table} where {old_weeks} or {_week_where(NEW)}")
        run(f"insert into {table} select * from {backup}")
        clients.rest.delete_dataset(backup_dataset, delete_contents=True)
        _load(settings, clients, [RESTATED, SHRUNK, NEW])
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            conn.execute(
                f"delete from {settings.control_schema}.checkpoints where table_name = %s and slice_start >= %s",
                (SQP_TABLE, NEW - timedelta(days=6)),
            )
            for schema in ("staging", "intermediate", "marts", "summaries"):
                conn.execute(f"drop schema if exists {schema}{CMP} cascade")
        restored = _full_refresh()
        assert restored["status"] == "success", restored["message"]


def _full_refresh() -> dict[str, Any]:
    """The SQP table reloaded and its models rebuilt in full by the flow (recorded, so no slice
    is left awaiting a dbt build)."""
    from flows.orchestration.daily_refresh import daily_refresh

    return daily_refresh(tables=[SQP_TABLE], full_refresh=True, trigger="test")  # type: ignore[no-any-return]


def _slice(week: date) -> tuple[date, date]:
    """The ISO-week slice (Monday start) that holds the SQP week starting on Sunday `week`."""
    return week - timedelta(days=6), week + timedelta(days=1)


def test_slices_without_a_successful_dbt_build_are_rebuilt_by_the_next_run(
    refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients
) -> None:
    """A run that applied a slice but whose dbt build never succeeded (here: none ran) leaves
    it owed: the next run rebuilds it too, and a successful build clears it."""
    assert refreshed["status"] == "success", refreshed["message"]
    [first] = _load(settings, clients, [RESTATED])
    assert first.changed_slices == [_slice(RESTATED)]
    [second] = _load(settings, clients, [SHRUNK])
    assert second.changed_slices == [_slice(SHRUNK), _slice(RESTATED)]
    args = dbt_selection.dbt_build_args([second], False, dbt_selection.dbt_sources(settings.dbt_project_dir))
    # The owed slice counts as every day of its range; the one applied now as the day it holds.
    owed_days = [_slice(RESTATED)[0] + timedelta(days=i) for i in range(7)]
    assert args is not None and json.loads(args[4]) == {
        "refresh_days": [d.isoformat() for d in [*owed_days, SHRUNK]]
    }
    assert _full_refresh()["status"] == "success"
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        assert rebuilds.slices_awaiting_dbt(conn, settings.control_schema, SQP_TABLE, uuid4(), 60) == []


def test_a_whole_table_changes_models_only_when_loaded_or_owed(
    refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients
) -> None:
    """The catalog (full_replace) selects its models when this run loads it, or when a load of
    it still waits for a successful dbt build; found unchanged and owed nothing, it does not."""
    assert refreshed["status"] == "success", refreshed["message"]
    sources = dbt_selection.dbt_sources(settings.dbt_project_dir)

    def refresh_products(options: RefreshOptions) -> TableOutcome:
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            cfg = registry.get(conn, settings.control_schema, PRODUCTS_TABLE)
        with locked_run(settings) as run_id:
            outcome = refresh_table(settings, clients, cfg, run_id, options)
        assert outcome.status == "success", outcome.error
        return outcome

    # The session's refresh built dbt after loading it: unchanged now, nothing to rebuild.
    quiet = refresh_products(RefreshOptions())
    assert quiet.slices_done == 0 and not quiet.replaced_whole
    assert dbt_selection.dbt_build_args([quiet], False, sources) is None
    # Loaded again by a run that never builds dbt (here: none ran)...
    loaded = refresh_products(RefreshOptions(full_refresh=True))
    assert loaded.slices_done == 1 and loaded.replaced_whole
    # ...the next run finds it unchanged but owes its models a rebuild.
    owed = refresh_products(RefreshOptions())
    assert owed.slices_done == 0 and owed.replaced_whole
    args = dbt_selection.dbt_build_args([owed], False, sources)
    assert args is not None and args[2].startswith(f"source:sqp.{PRODUCTS_TABLE}+") and args[4] == "{}"
    # A successful build of its selection settles it.
    from flows.orchestration.daily_refresh import daily_refresh

    settled = daily_refresh(tables=[PRODUCTS_TABLE], trigger="test")
    assert settled["status"] == "success" and settled["dbt_invocation_id"] is not None, settled
    assert not refresh_products(RefreshOptions()).replaced_whole


def _invocations(pg: psycopg.Connection, model: str, column: str) -> dict[date, set[str]]:
    out: dict[date, set[str]] = {}
    for period, invocation in pg.execute(
        f"select distinct {column}, _dbt_invocation_id from {model}"
    ).fetchall():
        out.setdefault(period, set()).add(invocation)
    return out


def _columns(pg: psycopg.Connection, model: str) -> list[str]:
    schema, name = model.split(".")
    rows = pg.execute(
        "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
        "and column_name <> '_dbt_invocation_id' order by ordinal_position",
        (schema, name),
    ).fetchall()
    return [r[0] for r in rows]


def test_changed_weeks_rebuild_their_periods_only_and_equal_a_full_rebuild(
    changed_source: None, settings: Settings, clients: BigQueryClients, pg: psycopg.Connection
) -> None:
    before = {m: _invocations(pg, m, c) for m, c in MODELS.items()}
    outcomes = _load(settings, clients, [RESTATED, SHRUNK, NEW])
    slices = [s for o in outcomes for s in o.changed_slices]
    assert slices == [_slice(w) for w in (RESTATED, SHRUNK, NEW)]

    args = dbt_selection.dbt_build_args(outcomes, False, dbt_selection.dbt_sources(settings.dbt_project_dir))
    assert args is not None
    assert json.loads(args[4]) == {"refresh_days": [w.isoformat() for w in (RESTATED, SHRUNK, NEW)]}
    log = target_dir(settings).parent / "logs" / "dbt.log"
    logged_before = log.stat().st_size if log.exists() else 0
    dbt = run_dbt(settings, args)
    assert dbt.success, dbt.message
    # dbt's log file keeps the INFO lines (the CLI's progress reads them), with the periods
    with log.open(errors="replace") as f:
        f.seek(logged_before)
        logged = f.read()
    assert "monthly_summary: rebuilding periods 2026-10-01..2026-12-01 (refresh_days)" in logged
    assert "OK created sql incremental model summaries.monthly_summary" in logged
    tested = [n["name"] for n in dbt.nodes if n["resource_type"] == "test"]
    # the windowed rollup checks and the check that no longer period was left out passed
    for check in (
        "assert_monthly_summary_matches_weekly",
        "assert_quarterly_summary_matches_monthly",
        "assert_yearly_summary_matches_quarterly",
        "assert_summary_periods_rebuilt_with_their_weeks",
    ):
        assert check in tested, tested

    expected = periods_to_rebuild(slices)
    assert expected.months == [date(2026, 10, 1), date(2026, 11, 1)]
    assert expected.quarters == [date(2026, 10, 1)] and expected.years == [date(2026, 1, 1)]
    rebuilt_for = {
        "summaries.monthly_summary": set(expected.months),
        "summaries.quarterly_summary": set(expected.quarters),
        "summaries.yearly_summary": set(expected.years),
    }
    changed_weeks = {RESTATED, SHRUNK, NEW}
    for model, column in MODELS.items():
        after = _invocations(pg, model, column)
        want = rebuilt_for.get(model, changed_weeks)
        rebuilt = {p for p, inv in after.items() if inv == {dbt.invocation_id}}
        assert rebuilt == want, f"{model}: rebuilt {sorted(rebuilt)}, expected {sorted(want)}"
        kept = {p: inv for p, inv in after.items() if p not in want}
        assert kept == {p: inv for p, inv in before[model].items() if p not in want}, model
        assert kept or model == "summaries.yearly_summary", f"{model}: no kept period to check"

    _assert_equals_full_rebuild(settings, pg)
    assert pg.execute(
        "select count(*) from summaries.weekly_summary where period_start = %s and asin = %s",
        (SHRUNK, DROPPED_ASIN),
    ).fetchone() == (0,)


# Weeks whose ISO week (the slice) crosses a month end, all rows dated on the Sunday in the
# later month: CROSSING (Oct 26..Nov 1) restated, EMPTIED (Sep 28..Oct 4) loses all its rows.
CROSSING = date(2026, 11, 1)
EMPTIED = date(2026, 10, 4)


@contextlib.contextmanager
def _source_changed(
    settings: Settings, clients: BigQueryClients, restate: list[date], empty: list[date]
) -> Iterator[None]:
    """The `restate` weeks changed and the `empty` weeks' rows deleted in the source; all put
    back afterwards (source, raw table, models rebuilt in full)."""
    table = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"
    backup_dataset = f"{clients.project}.changed_days_{uuid4().hex[:8]}"
    clients.rest.create_dataset(backup_dataset)
    backup = f"`{backup_dataset}.{SQP_TABLE}`"
    weeks = [*restate, *empty]
    touched = " or ".join(_week_where(w) for w in weeks)

    def run(statement: str) -> None:
        clients.rest.query(statement).result()

    try:
        run(f"create table {backup} as select * from {table} where {touched}")
        for week in restate:
            run(
                f"update {table} set `ASIN Impression Count` = `ASIN Impression Count` + 1000 "
                f"where {_week_where(week)}"
            )
        for week in empty:
            run(f"delete from {table} where {_week_where(week)}")
        yield
    finally:
        run(f"delete from {table} where {touched}")
        run(f"insert into {table} select * from {backup}")
        clients.rest.delete_dataset(backup_dataset, delete_contents=True)
        _load(settings, clients, weeks)
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            for schema in ("staging", "intermediate", "marts", "summaries"):
                conn.execute(f"drop schema if exists {schema}{CMP} cascade")
        restored = _full_refresh()
        assert restored["status"] == "success", restored["message"]


def _rebuilt(
    pg: psycopg.Connection, invocation_id: str | None, models: dict[str, str] | None = None
) -> dict[str, set[date]]:
    """Per model, the periods whose rows all carry `invocation_id`."""
    return {
        m: {p for p, inv in _invocations(pg, m, c).items() if inv == {invocation_id}}
        for m, c in (models or MODELS).items()
    }


def _assert_equals_full_rebuild(
    settings: Settings, pg: psycopg.Connection, models: dict[str, str] | None = None
) -> None:
    full = run_dbt(
        settings, ["run", *SQP_BUILD, "--full-refresh", "--vars", json.dumps({"schema_suffix": CMP})]
    )
    assert full.success, full.message
    for model in models or MODELS:
        columns = ", ".join(_columns(pg, model))
        assert columns
        schema, name = model.split(".")
        full_model = f"{schema}{CMP}.{name}"
        for left, right in ((model, full_model), (full_model, model)):
            diff = pg.execute(
                f"select count(*) from (select {columns} from {left} except all select {columns} from {right}) d"
            ).fetchone()
            assert diff == (0,), f"{left} has {diff[0] if diff else '?'} rows not in {right}"


def _build_changed_days(
    settings: Settings, pg: psycopg.Connection, outcome: TableOutcome, day: date
) -> dict[str, set[date]]:
    """The daily dbt build of one slice whose only changed day is `day`: its args carry exactly
    that day; returns the periods each model rebuilt."""
    args = dbt_selection.dbt_build_args([outcome], False, dbt_selection.dbt_sources(settings.dbt_project_dir))
    assert args is not None and json.loads(args[4]) == {"refresh_days": [day.isoformat()]}
    dbt = run_dbt(settings, args)
    assert dbt.success, dbt.message
    return _rebuilt(pg, dbt.invocation_id)


def test_a_week_across_a_month_end_rebuilds_only_the_month_holding_its_rows(
    refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients, pg: psycopg.Connection
) -> None:
    assert refreshed["status"] == "success", refreshed["message"]
    with _source_changed(settings, clients, restate=[CROSSING], empty=[]):
        [outcome] = _load(settings, clients, [CROSSING])
        assert outcome.changed_slices == [_slice(CROSSING)]
        assert outcome.slice_days == {_slice(CROSSING): [CROSSING]}
        rebuilt = _build_changed_days(settings, pg, outcome, CROSSING)
        # The ISO week starts in October; every changed row lies in November: October is kept.
        assert rebuilt["summaries.monthly_summary"] == {date(2026, 11, 1)}
        assert rebuilt["summaries.quarterly_summary"] == {date(2026, 10, 1)}
        assert rebuilt["summaries.yearly_summary"] == {date(2026, 1, 1)}
        for model in ("marts.search_query_performance", "summaries.weekly_summary"):
            assert rebuilt[model] == {CROSSING}, model
        _assert_equals_full_rebuild(settings, pg)


def test_a_day_that_loses_all_its_rows_still_rebuilds_its_month(
    refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients, pg: psycopg.Connection
) -> None:
    assert refreshed["status"] == "success", refreshed["message"]
    with _source_changed(settings, clients, restate=[], empty=[EMPTIED]):
        [outcome] = _load(settings, clients, [EMPTIED])
        assert outcome.rows_inserted == 0 and outcome.rows_deleted > 0
        # The deleted rows' day counts: nothing was inserted.
        assert outcome.slice_days == {_slice(EMPTIED): [EMPTIED]}
        rebuilt = _build_changed_days(settings, pg, outcome, EMPTIED)
        # October (the month of the emptied day) is rebuilt; September (where its ISO week
        # starts) is kept.
        assert rebuilt["summaries.monthly_summary"] == {date(2026, 10, 1)}
        assert rebuilt["summaries.quarterly_summary"] == {date(2026, 10, 1)}


# Withdrawn whole at the source inside the lookback: the SQP week of Sunday 2026-11-08 (its
# month, quarter and year hold other weeks) and the daily table's Wednesday 2026-11-18 (its
# ISO week, the slice, holds other days; the daily table's lookback starts 2026-11-14).
WITHDRAWN_WEEK = date(2026, 11, 8)
WITHDRAWN_DAY = date(2026, 11, 18)
DAILY_MODELS = {"marts.daily_search_terms": "search_date"}
WEEKLY_MODELS = {
    m: c for m, c in MODELS.items() if m.startswith(("marts.", "intermediate.", "summaries.weekly"))
}


@contextlib.contextmanager
def _withdrawn(settings: Settings, clients: BigQueryClients, table: str, where: str) -> Iterator[None]:
    """Every row of `table` matching `where` deleted in the source; put back afterwards (source,
    then the table reloaded and its models rebuilt in full)."""
    path = f"`{clients.project}.{clients.dataset}.{table}`"
    backup_dataset = f"{clients.project}.withdrawn_{uuid4().hex[:8]}"
    clients.rest.create_dataset(backup_dataset)
    backup = f"`{backup_dataset}.{table}`"

    def run(statement: str) -> None:
        clients.rest.query(statement).result()

    try:
        run(f"create table {backup} as select * from {path} where {where}")
        run(f"delete from {path} where {where}")
        yield
    finally:
        run(f"delete from {path} where {where}")
        run(f"insert into {path} select * from {backup}")
        clients.rest.delete_dataset(backup_dataset, delete_contents=True)
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            for schema in ("staging", "intermediate", "marts", "summaries"):
                conn.execute(f"drop schema if exists {schema}{CMP} cascade")
        from flows.orchestration.daily_refresh import daily_refresh

        restored = daily_refresh(tables=[table], full_refresh=True, trigger="test")
        assert restored["status"] == "success", restored["message"]


def _normal_run(
    settings: Settings, clients: BigQueryClients, pg: psycopg.Connection, table: str, day: date
) -> str:
    """A normal daily run of `table` (not forced, not full), after `refresh run --explain` of it:
    the run's dbt invocation id. `day` (withdrawn) is among the days the explain predicted,
    and the run hands dbt those days."""
    from flows.orchestration.daily_refresh import daily_refresh

    ex = explain(settings, clients, RunParams(tables=[table]), datetime.now(UTC))
    run = daily_refresh(tables=[table], trigger="test")
    assert run["status"] == "success", run["message"]
    invocation_id: str = run["dbt_invocation_id"]
    assert invocation_id is not None, run
    row = pg.execute(
        f"select args from {settings.control_schema}.dbt_invocations where invocation_id = %s",
        (invocation_id,),
    ).fetchone()
    assert row is not None
    args = row[0]
    audited = json.loads(args[args.index("--vars") + 1])
    assert ex.dbt_vars is not None and day.isoformat() in ex.dbt_vars["refresh_days"], ex.dbt_vars
    assert {k: audited.get(k) for k in ex.dbt_vars} == ex.dbt_vars, audited
    return invocation_id


def _count(pg: psycopg.Connection, model: str, column: str, period: date) -> int:
    row = pg.execute(f"select count(*) from {model} where {column} = %s", (period,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_week_withdrawn_at_the_source_leaves_every_model_with_the_next_normal_run(
    refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients, pg: psycopg.Connection
) -> None:
    assert refreshed["status"] == "success", refreshed["message"]
    for model, column in WEEKLY_MODELS.items():
        assert _count(pg, model, column, WITHDRAWN_WEEK) > 0, model
    with _withdrawn(settings, clients, SQP_TABLE, _week_where(WITHDRAWN_WEEK)):
        invocation_id = _normal_run(settings, clients, pg, SQP_TABLE, WITHDRAWN_WEEK)
        # The week is gone from every weekly model, in the mart and the weekly summary too.
        for model, column in WEEKLY_MODELS.items():
            assert _count(pg, model, column, WITHDRAWN_WEEK) == 0, model
        # Its month, quarter and year were recomputed by this run (without it).
        rebuilt = _rebuilt(pg, invocation_id)
        assert date(2026, 11, 1) in rebuilt["summaries.monthly_summary"]
        assert date(2026, 10, 1) in rebuilt["summaries.quarterly_summary"]
        assert date(2026, 1, 1) in rebuilt["summaries.yearly_summary"]
        _assert_equals_full_rebuild(settings, pg)


def test_a_day_withdrawn_at_the_source_leaves_the_daily_models_with_the_next_normal_run(
    refreshed: dict[str, Any], settings: Settings, clients: BigQueryClients, pg: psycopg.Connection
) -> None:
    assert refreshed["status"] == "success", refreshed["message"]
    mart = "marts.daily_search_terms"
    staging = "staging.stg_sqp__daily_search_terms"
    assert _count(pg, mart, "search_date", WITHDRAWN_DAY) > 0
    with _withdrawn(settings, clients, DAILY_TABLE, f"`date` = date '{WITHDRAWN_DAY}'"):
        invocation_id = _normal_run(settings, clients, pg, DAILY_TABLE, WITHDRAWN_DAY)
        assert _count(pg, staging, "search_date", WITHDRAWN_DAY) == 0
        assert _count(pg, mart, "search_date", WITHDRAWN_DAY) == 0
        # The other days of its slice were rebuilt by this run.
        rebuilt = _rebuilt(pg, invocation_id, DAILY_MODELS)[mart]
        assert WITHDRAWN_DAY - timedelta(days=1) in rebuilt and WITHDRAWN_DAY + timedelta(days=1) in rebuilt
        _assert_equals_full_rebuild(settings, pg, DAILY_MODELS)


@pytest.mark.parametrize(
    "dbt_vars",
    [{"refresh_start_date": "2026-11-01"}, {}],
    ids=["refresh_start_date", "lookback"],
)
def test_a_withdrawn_week_leaves_the_models_rebuilt_from_a_date(
    refreshed: dict[str, Any],
    settings: Settings,
    clients: BigQueryClients,
    pg: psycopg.Connection,
    dbt_vars: dict[str, Any],
) -> None:
    """Without refresh_days (a backfill's refresh_start_date, or a plain `dbt build`: the
    lookback from each model's watermark) every period from the window start is replaced,
    the emptied one included."""
    assert refreshed["status"] == "success", refreshed["message"]
    with _withdrawn(settings, clients, SQP_TABLE, _week_where(WITHDRAWN_WEEK)):
        _load(settings, clients, [WITHDRAWN_WEEK])
        dbt = run_dbt(settings, ["build", *SQP_BUILD, "--vars", json.dumps(dbt_vars)])
        assert dbt.success, dbt.message
        for model, column in WEEKLY_MODELS.items():
            assert _count(pg, model, column, WITHDRAWN_WEEK) == 0, model
        assert date(2026, 11, 1) in _rebuilt(pg, dbt.invocation_id)["summaries.monthly_summary"]
        _assert_equals_full_rebuild(settings, pg)


def _failed_tests(dbt: Any) -> dict[str, int | None]:
    return {n["name"]: n["failures"] for n in dbt.failed_nodes}


def test_the_summary_checks_catch_a_wrong_period_and_a_longer_period_left_out(
    refreshed: dict[str, Any], settings: Settings, pg: psycopg.Connection
) -> None:
    """The daily build checks each rebuilt summary period against the finer summary it is
    built from, and that every month, quarter and year holding a rebuilt week was rebuilt too."""
    assert refreshed["status"] == "success", refreshed["message"]
    day = date(2026, 11, 15)  # an SQP week of November, Q4 and 2026
    window = {"refresh_days": [day.isoformat()]}
    checks = [
        "--select",
        "assert_quarterly_summary_matches_monthly",
        "assert_yearly_summary_matches_quarterly",
    ]
    quarter = date(2026, 10, 1)
    [(key, asin)] = pg.execute(
        "select search_query_key, asin from summaries.quarterly_summary where period_start = %s "
        "order by search_query_key, asin limit 1",
        (quarter,),
    ).fetchall()
    corrupt = (
        "update summaries.quarterly_summary set impressions = impressions + %s "
        "where period_start = %s and search_query_key = %s and asin = %s"
    )
    pg.execute(corrupt, (1, quarter, key, asin))
    try:
        dbt = run_dbt(settings, ["test", *checks, "--vars", json.dumps(window)])
        # One quarterly row off: it differs from its months, and its year from its quarters.
        assert _failed_tests(dbt) == {
            "assert_quarterly_summary_matches_monthly": 1,
            "assert_yearly_summary_matches_quarterly": 1,
        }, dbt.nodes
        # Outside the rebuilt periods nothing is read: a day of Q3 (the Sunday full test's job).
        dbt = run_dbt(
            settings,
            [
                "test",
                "--select",
                "assert_quarterly_summary_matches_monthly",
                "--vars",
                json.dumps({"refresh_days": ["2026-08-16"]}),
            ],
        )
        assert dbt.success and _failed_tests(dbt) == {}, dbt.nodes
    finally:
        pg.execute(corrupt, (-1, quarter, key, asin))
    dbt = run_dbt(settings, ["test", *checks, "--vars", json.dumps(window)])
    assert dbt.success, dbt.nodes

    # The week rebuilt alone: its month, quarter and year were not, and the check says which.
    lineage = "assert_summary_periods_rebuilt_with_their_weeks"
    dbt = run_dbt(settings, ["build", "--select", "weekly_summary", lineage, "--vars", json.dumps(window)])
    assert _failed_tests(dbt) == {lineage: 3}, dbt.nodes
    # Rebuilt with them, it passes.
    dbt = run_dbt(settings, ["build", "--select", "weekly_summary+", "--vars", json.dumps(window)])
    assert dbt.success and lineage in {n["name"] for n in dbt.nodes}, dbt.nodes


@pytest.mark.parametrize(
    ("dbt_vars", "message"),
    [
        ({"refresh_weeks": ["2026-11-17"]}, "var refresh_weeks must be a list of Monday dates"),
        ({"refresh_weeks": "2026-11-16"}, "var refresh_weeks must be a list of Monday dates"),
        ({"refresh_weeks": ["2026-02-30"]}, "var refresh_weeks must be a list of Monday dates"),
        (
            {"refresh_weeks": ["2026-11-16"], "refresh_start_date": "2026-11-01"},
            "vars refresh_weeks and refresh_start_date exclude each other",
        ),
        ({"refresh_days": ["2026-02-30"]}, "var refresh_days must be a list of dates 'YYYY-MM-DD'"),
        ({"refresh_days": "2026-11-22"}, "var refresh_days must be a list of dates 'YYYY-MM-DD'"),
        ({"refresh_days": ["22/11/2026"]}, "var refresh_days must be a list of dates 'YYYY-MM-DD'"),
        (
            {"refresh_days": ["2026-11-22"], "refresh_weeks": ["2026-11-16"]},
            "vars refresh_days and refresh_weeks exclude each other",
        ),
        (
            {"refresh_days": ["2026-11-22"], "refresh_start_date": "2026-11-01"},
            "vars refresh_days and refresh_start_date exclude each other",
        ),
    ],
)
def test_bad_refresh_weeks_stop_the_build_with_one_clear_error(
    refreshed: dict[str, Any], settings: Settings, dbt_vars: dict[str, Any], message: str
) -> None:
    # PrefectDbtRunner raises on a compilation error (as for a bad refresh_start_date).
    with pytest.raises(ValueError, match=r"Compilation Error in model search_query_performance") as raised:
        run_dbt(settings, ["compile", "--select", "search_query_performance", "--vars", json.dumps(dbt_vars)])
    assert message in str(raised.value), raised.value


def test_the_changed_weeks_reach_the_models_without_a_full_parse(
    refreshed: dict[str, Any], settings: Settings
) -> None:
    # Every daily run changes its weeks: as a dbt var that re-parsed the whole project each run.
    log = target_dir(settings).parent / "logs" / "dbt.log"
    appended = ""
    for week in ("2026-11-09", "2026-11-16"):
        logged_before = log.stat().st_size if log.exists() else 0
        args = [
            "compile",
            "--select",
            "search_query_performance",
            "--vars",
            json.dumps({"refresh_weeks": [week]}),
        ]
        dbt = run_dbt(settings, args)
        assert dbt.success, dbt.message
        assert json.loads(dbt.args[4])["refresh_weeks"] == [week]  # audited as given
        with log.open(errors="replace") as f:
            f.seek(logged_before)
            appended = f.read()
    # The second run: partial parsing held, and the macro still saw its week.
    assert "Unable to do partial parsing" not in appended, appended[-3000:]
    assert "search_query_performance: rebuilding periods 2026-11-16..2026-11-23 (refresh_weeks)" in appended


def test_a_bad_memory_var_stops_the_build_with_one_clear_error(
    refreshed: dict[str, Any], settings: Settings
) -> None:
    # Templated into SET LOCAL of every incremental model: anything but a size stops the parse.
    bad = {"dbt_work_mem": "64MB'; drop table x; --"}
    with pytest.raises(ValueError, match=r"var dbt_work_mem must be a size such as '64MB'"):
        run_dbt(settings, ["compile", "--select", "search_query_performance", "--vars", json.dumps(bad)])


def test_weekly_full_dbt_test_checks_every_row_and_is_recorded(
    refreshed: dict[str, Any], settings: Settings, pg: psycopg.Connection
) -> None:
    from flows.orchestration.housekeeping import run_full_dbt_test

    result = run_full_dbt_test(settings, wait_s=60, poll_s=1)
    assert result["success"] and result["failed"] == [], result
    assert result["tests"] > 100  # every test of the project, not a selection
    row = pg.execute(
        f"select command, success, run_id, nodes_total from {settings.control_schema}.dbt_invocations "
        "where invocation_id = %s",
        (result["invocation_id"],),
    ).fetchone()
    assert row == ("test", True, None, result["tests"])
