"""--explain's account of what dbt will rebuild: the run's own rule over predicted days."""

from __future__ import annotations

from datetime import date

from flows.control.statuses import TableStatus
from flows.control.tables import TableOutcome
from flows.engine.table_refresh import RefreshOptions
from flows.orchestration.explain import Explanation, day_ranges, owed_slices, rebuild_periods, render

# An ISO week across a month end whose rows all lie on its Sunday, in November.
CROSSING = (date(2026, 10, 26), date(2026, 11, 2))
OWED = (date(2026, 10, 12), date(2026, 10, 19))


def _outcome(days: dict[tuple[date, date], list[date]], owed: list[tuple[date, date]] = ()) -> TableOutcome:
    o = TableOutcome("search_query_performance", TableStatus.PLANNED, "live")
    o.plan = [{"slice": f"{a}..{b}", "change": "changed", "reason": "fingerprint differs"} for a, b in days]
    o.changed_slices = [*days, *owed]
    o.slice_days = dict(days)
    return o


def test_known_days_rebuild_only_their_periods() -> None:
    periods, source, dbt_vars = rebuild_periods([_outcome({CROSSING: [date(2026, 11, 1)]})], RefreshOptions())
    assert source == "days" and dbt_vars == {"refresh_days": ["2026-11-01"]}
    # The ISO week starts in October; its rows lie in November only: October is not rebuilt.
    assert periods["months"] == ["2026-11-01"] and periods["quarters"] == ["2026-10-01"]
    assert periods["years"] == ["2026-01-01"]


def test_an_owed_slice_counts_as_every_day_of_its_range() -> None:
    outcome = _outcome({CROSSING: [date(2026, 11, 1)]}, owed=[OWED])
    assert owed_slices(outcome) == [OWED]
    periods, source, dbt_vars = rebuild_periods([outcome], RefreshOptions())
    assert source == "slices"
    assert dbt_vars["refresh_days"] == [f"2026-10-{d}" for d in range(12, 19)] + ["2026-11-01"]
    assert periods["months"] == ["2026-10-01", "2026-11-01"]
    lines = render(
        Explanation(
            tables=[outcome],
            dbt_select="source:sqp.x+",
            periods=periods,
            periods_from=source,
            dbt_vars=dbt_vars,
        )
    )
    assert any("2026-10-12..2026-10-19" in line and "owed" in line for line in lines), lines
    assert "  days: 2026-10-12..2026-10-18, 2026-11-01" in lines


def test_a_full_refresh_rebuilds_every_period() -> None:
    outcome = _outcome({CROSSING: [date(2026, 11, 1)]})
    assert rebuild_periods([outcome], RefreshOptions(full_refresh=True)) == ({}, "everything", {})


def test_day_ranges_join_consecutive_days() -> None:
    days = [date(2026, 11, 3), date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 8)]
    assert day_ranges(days) == "2026-11-01..2026-11-03, 2026-11-08"
    assert day_ranges([]) == ""
