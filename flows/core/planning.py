"""Slice planning: which cursor ranges of a table to (re)load in this run. Pure functions.

A slice is a half-open range [start, end) of the cursor column, aligned to the table's slice
size (day; ISO week starting Monday; calendar month), in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from flows.core.errors import ConfigError
from flows.core.table_config import SliceSize, TableConfig, WriteStrategy


@dataclass(frozen=True)
class Slice:
    start: date | None  # None: the whole table (full_replace)
    end: date | None

    @property
    def label(self) -> str:
        return "full" if self.start is None else f"{self.start}..{self.end}"

    # None for the whole table: no timestamp stands for "unbounded" (the control schema
    # stores it as -infinity..infinity, flows.control.checkpoints).
    @property
    def start_ts(self) -> datetime | None:
        return None if self.start is None else to_ts(self.start)

    @property
    def end_ts(self) -> datetime | None:
        return None if self.end is None else to_ts(self.end)

    def within(self, other: Slice) -> bool:
        """Whether this slice lies inside `other` (every slice lies inside the whole table)."""
        if other.start is None or other.end is None:
            return True
        return (
            self.start is not None
            and self.end is not None
            and other.start <= self.start
            and self.end <= other.end
        )


def to_ts(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def align(d: date, size: SliceSize) -> date:
    if size is SliceSize.DAY:
        return d
    if size is SliceSize.WEEK:
        return d - timedelta(days=d.weekday())
    return d.replace(day=1)


def next_boundary(d: date, size: SliceSize) -> date:
    if size is SliceSize.DAY:
        return d + timedelta(days=1)
    if size is SliceSize.WEEK:
        return d + timedelta(days=7)
    return date(d.year + (d.month == 12), d.month % 12 + 1, 1)


def slices_between(first: date, last: date, size: SliceSize) -> list[Slice]:
    """Aligned slices covering every day from `first` to `last` inclusive."""
    out: list[Slice] = []
    cur = align(first, size)
    while cur <= last:
        nxt = next_boundary(cur, size)
        out.append(Slice(cur, nxt))
        cur = nxt
    return out


def count_slices(first: date, last: date, size: SliceSize) -> int:
    """len(slices_between(first, last, size)), computed without listing them (a request may
    name a range of centuries)."""
    if first > last:
        return 0
    if size is SliceSize.DAY:
        return (last - first).days + 1
    if size is SliceSize.WEEK:
        return (align(last, size) - align(first, size)).days // 7 + 1
    return (last.year - first.year) * 12 + last.month - first.month + 1


@dataclass(frozen=True)
class Window:
    first: date
    last: date  # inclusive
    reason: str


def plan_window(
    cfg: TableConfig,
    source_min: date | None,
    source_max: date | None,
    high_water: date | None,
    start_date: date | None = None,
    end_date: date | None = None,
    full_refresh: bool = False,
) -> Window | None:
    """The cursor window to load, or None when the source holds nothing to load.

    - explicit start/end (backfill): exactly that range (clipped to the source's end only when
      no end is given);
    - full refresh or first load: the whole source range;
    - otherwise: from the high-water mark minus the lookback window (late restatements) to the
      newest source value.
    """
    if source_min is None or source_max is None:
        return None
    if start_date or end_date:
        # Days before the source's first are empty slices: one start_date far in the past
        # would plan thousands of them.
        first = max(start_date or source_min, source_min)
        last = end_date or source_max
        if start_date and end_date and start_date > end_date:
            raise ValueError(f"start date {start_date} is after end date {end_date}")
        if first > last:
            return None  # the whole range is before the source's first date
        return Window(first, last, "requested range")
    if full_refresh or high_water is None:
        return Window(source_min, source_max, "full refresh" if full_refresh else "first load")
    first = max(source_min, min(high_water, source_max) - timedelta(days=cfg.lookback_days))
    return Window(first, source_max, f"lookback {cfg.lookback_days}d from {high_water}")


def requested_slices(cfg: TableConfig, start_date: date, end_date: date) -> int:
    """Slices a backfill of [start_date, end_date] plans for the table at most (the run clips
    the range to the source's dates): one for a full_replace table."""
    if cfg.write_strategy is WriteStrategy.FULL_REPLACE:
        return 1
    return count_slices(start_date, end_date, cfg.slice_size)


def plan_slices(cfg: TableConfig, window: Window | None) -> list[Slice]:
    if cfg.write_strategy is WriteStrategy.FULL_REPLACE:
        return [Slice(None, None)]
    if window is None:
        return []
    return slices_between(window.first, window.last, cfg.slice_size)


def resumable(slices: list[Slice], committed_since_last_success: set[date]) -> tuple[list[Slice], int]:
    """Drop slices already committed by an unfinished earlier attempt (resume after a crash)."""
    todo = [s for s in slices if s.start is None or s.start not in committed_since_last_success]
    return todo, len(slices) - len(todo)


# A scheduled run takes a table whose due time is at most this far ahead of the run's anchor,
# so a run the scheduler starts a few minutes early, or a due time a few minutes late, does
# not leave the table to the run after. Capped at a quarter of the table's frequency.
MAX_DUE_TOLERANCE = timedelta(minutes=30)


def due_tolerance(cfg: TableConfig) -> timedelta:
    return min(timedelta(hours=cfg.refresh_frequency_hours) / 4, MAX_DUE_TOLERANCE)


def is_due(cfg: TableConfig, anchor: datetime, *, scheduled: bool) -> bool:
    """Never refreshed, or due by the run's anchor (plus the tolerance for a scheduled run).

    Other runs get no tolerance: they never take over a refresh the schedule is about to do.
    """
    if cfg.next_refresh_at is None:
        return True
    return cfg.next_refresh_at <= anchor + (due_tolerance(cfg) if scheduled else timedelta(0))


@dataclass(frozen=True)
class RefreshSchedule:
    """The daily flow's cron (REFRESH_SCHEDULE_CRON) in its time zone (REFRESH_SCHEDULE_TIMEZONE):
    the grid due times fall on."""

    cron: str
    timezone: str

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ConfigError(
                f"REFRESH_SCHEDULE_TIMEZONE {self.timezone!r} is not an IANA time zone (e.g. 'Europe/Berlin')"
            ) from None
        if not croniter.is_valid(self.cron):
            raise ConfigError(
                f"REFRESH_SCHEDULE_CRON {self.cron!r} is not a cron expression (5 fields, e.g. '0 2 * * *')"
            )

    def slot(self, at: datetime) -> datetime:
        """The schedule's latest tick at or before `at` (the slot a run at `at` belongs to)."""
        local = at.astimezone(ZoneInfo(self.timezone))
        tick: datetime = croniter(self.cron, local + timedelta(microseconds=1)).get_prev(datetime)
        return tick

    def plus(self, start: datetime, hours: int) -> datetime:
        """`start` plus `hours` on the schedule's wall clock (a daily 03:00 Berlin stays 03:00
        across daylight saving time), in UTC."""
        local = start.astimezone(ZoneInfo(self.timezone))
        return (local + timedelta(hours=hours)).astimezone(UTC)


def next_due(cfg: TableConfig, anchor: datetime, *, scheduled: bool, schedule: RefreshSchedule) -> datetime:
    """The table's next due time after a successful refresh by a run anchored at `anchor`.

    One rule for every run (scheduled, manual, API, backfill, forced): the run counts for a
    slot of the schedule (a scheduled run: its own anchor; any other run: the schedule's latest
    tick at or before its anchor), and the table is next due at the first of slot + n x frequency
    (n >= 1, on the schedule's wall clock) after the anchor; a due time this run did not reach
    (the table was not due for it: named or forced early) is kept when earlier. So a due time is
    never in the past after a success, and a manual run at 14:00 leaves a daily table due at the
    next 02:00, as the schedule would have.
    """
    slot = anchor if scheduled else schedule.slot(anchor)
    n = 1
    due = schedule.plus(slot, cfg.refresh_frequency_hours)
    while due <= anchor:
        n += 1
        due = schedule.plus(slot, n * cfg.refresh_frequency_hours)
    if cfg.next_refresh_at is not None and not is_due(cfg, anchor, scheduled=scheduled):
        due = min(due, cfg.next_refresh_at)
    return due
