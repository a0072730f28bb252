"""Which dbt periods a run rebuilds for the slices it changed. Pure functions.

The flow passes the ISO weeks (Monday starts) its applied slices touch to dbt as var
`refresh_weeks`; each incremental model and summary then replaces those weeks (weekly and daily
data) or every month, quarter and year overlapping them (macros/incremental_periods.sql,
refresh_week_ranges: the same rule as here). A week across a month end rebuilds both months:
a slice is a cursor range and does not say in which month its rows' week starts.
"""

from __future__ import annotations

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
