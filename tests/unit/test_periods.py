"""flows.engine.periods: the weeks and periods a run's changed slices rebuild."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from flows.engine.periods import changed_days, days_periods, period_start, periods_to_rebuild, weeks_touched


def test_a_quiet_day_rebuilds_the_new_week_its_month_quarter_and_year() -> None:
    periods = periods_to_rebuild([(date(2026, 11, 16), date(2026, 11, 23))])
    assert periods.weeks == [date(2026, 11, 16)]
    assert periods.months == [date(2026, 11, 1)]
    assert periods.quarters == [date(2026, 10, 1)]
    assert periods.years == [date(2026, 1, 1)]


def test_a_restated_week_in_march_and_a_new_week_rebuild_their_own_periods_only() -> None:
    periods = periods_to_rebuild(
        [(date(2026, 11, 16), date(2026, 11, 23)), (date(2026, 3, 9), date(2026, 3, 16))]
    )
    assert periods.weeks == [date(2026, 3, 9), date(2026, 11, 16)]
    assert periods.months == [date(2026, 3, 1), date(2026, 11, 1)]
    assert periods.quarters == [date(2026, 1, 1), date(2026, 10, 1)]
    assert periods.years == [date(2026, 1, 1)]
    assert periods.to_dict()["quarters"] == ["2026-01-01", "2026-10-01"]


def test_a_week_across_a_year_end_rebuilds_both_sides() -> None:
    # Mon 2026-12-28 .. Sun 2027-01-03
    periods = periods_to_rebuild([(date(2026, 12, 28), date(2027, 1, 4))])
    assert periods.weeks == [date(2026, 12, 28)]
    assert periods.months == [date(2026, 12, 1), date(2027, 1, 1)]
    assert periods.quarters == [date(2026, 10, 1), date(2027, 1, 1)]
    assert periods.years == [date(2026, 1, 1), date(2027, 1, 1)]


def test_slices_map_to_the_iso_weeks_they_touch() -> None:
    # a day slice, a month slice (five ISO weeks), duplicates merged
    assert weeks_touched([(date(2026, 11, 18), date(2026, 11, 19))]) == [date(2026, 11, 16)]
    assert weeks_touched([(date(2026, 2, 1), date(2026, 3, 1))]) == [
        date(2026, 1, 26),
        date(2026, 2, 2),
        date(2026, 2, 9),
        date(2026, 2, 16),
        date(2026, 2, 23),
    ]
    same = (date(2026, 11, 16), date(2026, 11, 23))
    assert weeks_touched([same, same]) == [date(2026, 11, 16)]
    assert weeks_touched([]) == []
    assert periods_to_rebuild([]).years == []
    with pytest.raises(ValueError, match="end must be after start"):
        weeks_touched([(date(2026, 11, 23), date(2026, 11, 16))])


def test_period_start() -> None:
    assert period_start(date(2026, 11, 22), "week") == date(2026, 11, 16)
    assert period_start(date(2026, 11, 22), "month") == date(2026, 11, 1)
    assert period_start(date(2026, 11, 22), "quarter") == date(2026, 10, 1)
    assert period_start(date(2026, 3, 31), "quarter") == date(2026, 1, 1)
    assert period_start(date(2026, 11, 22), "year") == date(2026, 1, 1)


def test_changed_days_use_the_known_days_and_whole_ranges_otherwise() -> None:
    crossing = (date(2026, 11, 30), date(2026, 12, 7))
    owed = (date(2026, 12, 28), date(2027, 1, 4))
    days = changed_days([crossing, owed], {crossing: [date(2026, 12, 6)]})
    assert days == [date(2026, 12, 6)] + [date(2026, 12, 28) + timedelta(days=i) for i in range(7)]
    assert changed_days([crossing], {crossing: []}) == []
    assert changed_days([], {}) == []
    with pytest.raises(ValueError, match="end must be after start"):
        changed_days([(date(2026, 12, 7), date(2026, 11, 30))], {})


def test_a_day_rebuilds_only_its_own_month_quarter_and_year() -> None:
    # Sunday 2026-12-06: its ISO week starts in November, its rows lie in December.
    periods = days_periods([date(2026, 12, 6)])
    assert periods.weeks == [date(2026, 11, 30)]
    assert periods.months == [date(2026, 12, 1)]
    assert periods.quarters == [date(2026, 10, 1)] and periods.years == [date(2026, 1, 1)]
    # the week rule on the same slice rebuilds both months
    assert periods_to_rebuild([(date(2026, 11, 30), date(2026, 12, 7))]).months == [
        date(2026, 11, 1),
        date(2026, 12, 1),
    ]
    year_end = days_periods([date(2027, 1, 3), date(2027, 1, 3)])
    assert year_end.months == [date(2027, 1, 1)] and year_end.years == [date(2027, 1, 1)]
    assert days_periods([]).months == []
