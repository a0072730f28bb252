import itertools
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.core.errors import ConfigError
from flows.core.planning import (
    RefreshSchedule,
    Slice,
    count_slices,
    due_tolerance,
    is_due,
    next_due,
    plan_slices,
    plan_window,
    requested_slices,
    resumable,
    slices_between,
)
from flows.core.table_config import SliceSize, TableConfig, WriteStrategy


def cfg(**kw: object) -> TableConfig:
    base: dict[str, object] = {
        "table_name": "t",
        "source_table": "t",
        "cursor_column": "Date",
        "slice_size": "week",
        "lookback_days": 14,
    }
    base.update(kw)
    return TableConfig(**base)  # type: ignore[arg-type]


def test_week_slices_are_aligned_and_cover_every_day() -> None:
    sl = slices_between(date(2024, 1, 3), date(2024, 1, 22), SliceSize.WEEK)
    assert sl[0] == Slice(date(2024, 1, 1), date(2024, 1, 8))
    assert sl[-1] == Slice(date(2024, 1, 22), date(2024, 1, 29))
    assert all(a.end == b.start for a, b in itertools.pairwise(sl))


def test_month_slices_cross_year() -> None:
    sl = slices_between(date(2023, 11, 15), date(2024, 1, 1), SliceSize.MONTH)
    assert [s.start for s in sl] == [date(2023, 11, 1), date(2023, 12, 1), date(2024, 1, 1)]
    assert sl[-1].end == date(2024, 2, 1)


def test_day_slices() -> None:
    assert len(slices_between(date(2024, 2, 27), date(2024, 3, 1), SliceSize.DAY)) == 4


def test_window_first_load_then_lookback() -> None:
    c = cfg()
    lo, hi = date(2023, 1, 1), date(2024, 6, 30)
    assert plan_window(c, lo, hi, None).first == lo  # type: ignore[union-attr]
    w = plan_window(c, lo, hi, high_water=date(2024, 7, 1))
    assert w is not None and w.first == hi - timedelta(days=14) and w.last == hi
    w = plan_window(c, lo, hi, high_water=date(2024, 3, 1))
    assert w is not None and w.first == date(2024, 3, 1) - timedelta(days=14)


def test_window_explicit_range_and_full_refresh() -> None:
    c = cfg()
    lo, hi = date(2023, 1, 1), date(2024, 6, 30)
    w = plan_window(c, lo, hi, date(2024, 7, 1), start_date=date(2023, 3, 1), end_date=date(2023, 3, 31))
    assert w is not None and (w.first, w.last) == (date(2023, 3, 1), date(2023, 3, 31))
    w = plan_window(c, lo, hi, date(2024, 7, 1), full_refresh=True)
    assert w is not None and w.first == lo
    assert plan_window(c, None, None, None) is None


def test_full_replace_is_one_slice() -> None:
    c = cfg(write_strategy=WriteStrategy.FULL_REPLACE, cursor_column=None)
    assert plan_slices(c, None) == [Slice(None, None)]


def test_resume_skips_committed_slices() -> None:
    sl = slices_between(date(2024, 1, 1), date(2024, 1, 28), SliceSize.WEEK)
    todo, skipped = resumable(sl, {date(2024, 1, 1), date(2024, 1, 8)})
    assert skipped == 2 and todo[0].start == date(2024, 1, 15)


# --- due times --------------------------------------------------------------------------------

T = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
DAILY = RefreshSchedule("0 2 * * *", "UTC")  # the default schedule; T is one of its ticks


def due_cfg(next_refresh_at: datetime | None, hours: int = 24) -> TableConfig:
    return cfg(next_refresh_at=next_refresh_at, refresh_frequency_hours=hours)


def test_a_never_refreshed_table_is_due_for_every_run() -> None:
    assert is_due(due_cfg(None), T, scheduled=False) and is_due(due_cfg(None), T, scheduled=True)


def test_scheduled_runs_take_tables_due_within_the_tolerance() -> None:
    assert due_tolerance(due_cfg(None, 24)) == timedelta(minutes=30)
    assert due_tolerance(due_cfg(None, 1)) == timedelta(minutes=15)
    early = T - timedelta(minutes=10)  # the scheduler (or cron) started ten minutes early
    assert is_due(due_cfg(T), early, scheduled=True)
    assert not is_due(due_cfg(T), early, scheduled=False)
    assert not is_due(due_cfg(T + timedelta(minutes=31)), T, scheduled=True)


def test_a_scheduled_run_sets_the_next_due_time_from_its_anchor_not_its_end() -> None:
    assert next_due(due_cfg(T), T, scheduled=True, schedule=DAILY) == T + timedelta(hours=24)
    assert next_due(due_cfg(T, 6), T - timedelta(minutes=3), scheduled=True, schedule=DAILY) == T + timedelta(
        hours=6, minutes=-3
    )


def test_other_runs_never_move_a_due_time_later() -> None:
    ahead = T + timedelta(hours=20)
    assert next_due(due_cfg(ahead), T, scheduled=False, schedule=DAILY) == ahead
    # passed minutes ago: the run took it, the next one is the next 02:00 (it stayed in the past)
    assert next_due(due_cfg(T), T + timedelta(minutes=5), scheduled=False, schedule=DAILY) == T + timedelta(
        days=1
    )
    # the schedule missed it (failed at 02:00, fixed by hand at 14:00): the next 02:00
    assert next_due(due_cfg(T), T + timedelta(hours=12), scheduled=False, schedule=DAILY) == T + timedelta(
        days=1
    )
    assert next_due(
        due_cfg(T), T + timedelta(days=3, hours=1), scheduled=False, schedule=DAILY
    ) == T + timedelta(days=4)
    # never refreshed: the next tick, not the run's anchor (in the past)
    assert next_due(due_cfg(None), T, scheduled=False, schedule=DAILY) == T + timedelta(days=1)


def test_after_any_successful_refresh_the_next_due_time_is_ahead_and_on_the_schedule() -> None:
    """Whatever the run (scheduled or not, due or forced), its anchor and the table's
    frequency: the due time it leaves is after the anchor, and a manual run never moves a due
    time it did not reach later."""
    for hours in (1, 6, 12, 24, 48, 168):
        for minutes in range(-30, 3 * 24 * 60, 97):
            anchor = T + timedelta(minutes=minutes)
            for due in (None, T - timedelta(days=2), T, T + timedelta(hours=hours), T + timedelta(days=9)):
                c = due_cfg(due, hours)
                for scheduled in (False, True):
                    got = next_due(c, anchor, scheduled=scheduled, schedule=DAILY)
                    assert got > anchor, (hours, anchor, due, scheduled, got)
                    if due is not None and due > anchor and not scheduled:
                        assert got <= due, (hours, anchor, due, got)
                    if not scheduled and (due is None or is_due(c, anchor, scheduled=False)):
                        # on the schedule's grid: a whole number of frequencies after a 02:00 tick
                        assert (got - DAILY.slot(anchor)) % timedelta(hours=hours) == timedelta(0)


def test_two_manual_runs_on_a_fresh_install_leave_every_table_due_at_the_next_tick() -> None:
    """`make run` twice at 14:03: each table due at tomorrow's 02:00, not at the first run's time."""
    first = T + timedelta(hours=12, minutes=3)
    due = next_due(due_cfg(None), first, scheduled=False, schedule=DAILY)
    assert due == T + timedelta(days=1)
    second = first + timedelta(minutes=1)  # forced: the table was not due
    assert not is_due(due_cfg(due), second, scheduled=False)
    assert next_due(due_cfg(due), second, scheduled=False, schedule=DAILY) == T + timedelta(days=1)
    # before today's 02:00: the run belongs to yesterday's slot, the table is due at 02:00 today
    early = T - timedelta(hours=1)
    assert next_due(due_cfg(None), early, scheduled=False, schedule=DAILY) == T


def test_a_table_refreshed_more_often_than_the_schedule_runs_is_due_at_its_next_step() -> None:
    assert next_due(
        due_cfg(None, 6), T + timedelta(hours=12), scheduled=False, schedule=DAILY
    ) == T + timedelta(hours=18)
    # a 48 h table keeps the every-other-day cadence the schedule gave it
    assert next_due(
        due_cfg(T + timedelta(days=1), 48), T + timedelta(hours=5), scheduled=False, schedule=DAILY
    ) == (T + timedelta(days=1))


def test_due_times_keep_the_schedules_wall_clock_across_daylight_saving_time() -> None:
    """Daily at 03:00 Berlin: the 03:00 run before clocks go forward leaves the table due at the
    next 03:00, 23 h later (anchor + 24 h would be 04:00 and miss that run)."""
    berlin = RefreshSchedule("0 3 * * *", "Europe/Berlin")
    before = datetime(2026, 3, 28, 2, 0, tzinfo=UTC)  # 03:00 CET
    next_tick = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    due = next_due(due_cfg(before), before, scheduled=True, schedule=berlin)
    assert due == next_tick and is_due(due_cfg(due), next_tick, scheduled=True)
    manual = datetime(2026, 3, 28, 13, 0, tzinfo=UTC)
    assert next_due(due_cfg(None), manual, scheduled=False, schedule=berlin) == next_tick


def test_a_bad_schedule_is_a_config_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="REFRESH_SCHEDULE_CRON"):
        RefreshSchedule("every day", "UTC")
    with pytest.raises(ConfigError, match="REFRESH_SCHEDULE_TIMEZONE"):
        RefreshSchedule("0 2 * * *", "Mars/Olympus")


def test_the_whole_table_slice_has_no_timestamp_bounds() -> None:
    # No timestamp stands for "unbounded": one at the edge of the range breaks in some zone.
    whole = plan_slices(cfg(write_strategy=WriteStrategy.FULL_REPLACE, cursor_column=None), None)
    assert [(s.start_ts, s.end_ts) for s in whole] == [(None, None)]
    week = Slice(date(2026, 1, 5), date(2026, 1, 12))
    assert (week.start_ts, week.end_ts) == (
        datetime(2026, 1, 5, tzinfo=UTC),
        datetime(2026, 1, 12, tzinfo=UTC),
    )
    span = Slice(date(2026, 1, 5), date(2026, 1, 19))
    assert week.within(span) and week.within(whole[0])
    assert not span.within(week) and not whole[0].within(span)
    assert not Slice(date(2026, 1, 12), date(2026, 1, 26)).within(span)


def test_a_backfill_start_before_the_source_is_clipped_to_its_first_date() -> None:
    c = cfg()
    lo, hi = date(2023, 1, 1), date(2024, 6, 30)
    w = plan_window(c, lo, hi, None, start_date=date(1, 1, 1))
    assert w is not None and (w.first, w.last) == (lo, hi)
    assert len(plan_slices(c, w)) == count_slices(lo, hi, SliceSize.WEEK) < 80
    w = plan_window(c, lo, hi, None, start_date=date(1900, 1, 1), end_date=date(2023, 2, 1))
    assert w is not None and (w.first, w.last) == (lo, date(2023, 2, 1))
    # a range wholly before the source's first date holds nothing to load
    assert plan_window(c, lo, hi, None, start_date=date(1900, 1, 1), end_date=date(1901, 1, 1)) is None


@given(st.dates(max_value=date(9000, 1, 1)), st.integers(0, 3000), st.sampled_from(list(SliceSize)))
def test_count_slices_is_the_number_of_slices_between(first: date, days: int, size: SliceSize) -> None:
    last = first + timedelta(days=days)
    assert count_slices(first, last, size) == len(slices_between(first, last, size))
    assert count_slices(last + timedelta(days=1), last, size) == 0


def test_requested_slices_per_table() -> None:
    assert requested_slices(cfg(slice_size="day"), date(2024, 1, 1), date(2024, 1, 31)) == 31
    assert requested_slices(cfg(), date(1, 1, 1), date(2026, 1, 1)) > 100_000
    full = cfg(write_strategy=WriteStrategy.FULL_REPLACE, cursor_column=None)
    assert requested_slices(full, date(1, 1, 1), date(2026, 1, 1)) == 1
