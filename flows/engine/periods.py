"""Which dbt periods a run rebuilds for the slices it changed. Pure functions.

A daily run passes dbt the days its applied slices changed (var `refresh_days`: the UTC days
of the cursor values each slice deleted or inserted, flows.engine.load.SliceResult.days; every day of
the range of a slice whose days are unknown); each incremental model and summary then replaces
those days (weekly and daily data: a row's period column is its cursor day) or the months,
quarters and years containing them (macros/incremental/rebuilt_periods.sql, refresh_ranges: the same
rule as here). So a week across a month end whose rows all lie in December rebuilds December
only. `refresh run --explain` predicts the same days without loading (flows.engine.table_refresh,
_predict_changes). The var `refresh_weeks` (ISO weeks, Monday starts; by hand and benches)
rebuilds every month, quarter and year overlapping them (periods_to_rebuild).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

PERIOD_MONTHS = {"month": 1, "quarter": 3, "year": 12}


@dataclass(frozen=True)
class Periods:
    """Starts of the periods to rebuild, each sorted."""

    weeks: list[date]
    months: list[date]
    quarters: list[date]
    years: list[date]

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "weeks": [d.isoformat() for d in self.weeks],
            "months": [d.isoformat() for d in self.months],
            "quarters": [d.isoformat() for d in self.quarters],
            "years": [d.isoformat() for d in self.years],
        }


def period_start(day: date, period: str) -> date:
    """The first day of the week (Monday), month, quarter or year containing `day`."""
    if period == "week":
        return day - timedelta(days=day.weekday())
    months = PERIOD_MONTHS[period]
    return date(day.year, (day.month - 1) // months * months + 1, 1)


def weeks_touched(changed_slices: list[tuple[date, date]]) -> list[date]:
    """Monday starts of the ISO weeks holding a day of any half-open [start, end) slice."""
    weeks: set[date] = set()
    for start, end in changed_slices:
        if end <= start:
            raise ValueError(f"slice {start}..{end}: end must be after start")
        week = period_start(start, "week")
        while week < end:
            weeks.add(week)
            week += timedelta(days=7)
    return sorted(weeks)


def periods_to_rebuild(changed_slices: list[tuple[date, date]]) -> Periods:
    """The weeks the slices touch and every month, quarter and year overlapping those weeks."""
    weeks = weeks_touched(changed_slices)

    def overlapping(period: str) -> list[date]:
        return sorted({period_start(d, period) for w in weeks for d in (w, w + timedelta(days=6))})

    return Periods(weeks, overlapping("month"), overlapping("quarter"), overlapping("year"))


def changed_days(
    changed_slices: list[tuple[date, date]], slice_days: dict[tuple[date, date], list[date]]
) -> list[date]:
    """The days the slices changed, sorted: `slice_days` of a slice when known, else every day
    of its half-open [start, end) range (a slice owed by an earlier run: conservative)."""
    days: set[date] = set()
    for start, end in changed_slices:
        if end <= start:
            raise ValueError(f"slice {start}..{end}: end must be after start")
        known = slice_days.get((start, end))
        if known is not None:
            days.update(known)
            continue
        day = start
        while day < end:
            days.add(day)
            day += timedelta(days=1)
    return sorted(days)


def days_periods(days: Iterable[date]) -> Periods:
    """The periods holding the changed `days`: each day's own week (the weekly rows dated on it
    are that week's), month, quarter and year. The days variant of periods_to_rebuild."""
    unique = set(days)

    def holding(period: str) -> list[date]:
        return sorted({period_start(d, period) for d in unique})

    return Periods(holding("week"), holding("month"), holding("quarter"), holding("year"))
