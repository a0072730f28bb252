"""Slice planning: which cursor ranges of a table to (re)load in this run. Pure functions.

A slice is a half-open range [start, end) of the cursor column, aligned to the table's slice
size (day; ISO week starting Monday; calendar month), in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from flows.registry import SliceSize, TableConfig, WriteStrategy


@dataclass(frozen=True)
class Slice:
    start: date | None  # None: the whole table (full_replace)
    end: date | None

    @property
    def label(self) -> str:
        return "full" if self.start is None else f"{self.start}..{self.end}"

    @property
    def start_ts(self) -> datetime:
        return to_ts(self.start) if self.start else datetime(1, 1, 1, tzinfo=UTC)

    @property
    def end_ts(self) -> datetime:
        return to_ts(self.end) if self.end else datetime(9999, 12, 31, tzinfo=UTC)


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
        first = start_date or source_min
        last = end_date or source_max
        if first > last:
            raise ValueError(f"start date {first} is after end date {last}")
        return Window(first, last, "requested range")
    if full_refresh or high_water is None:
        return Window(source_min, source_max, "full refresh" if full_refresh else "first load")
    first = max(source_min, min(high_water, source_max) - timedelta(days=cfg.lookback_days))
    return Window(first, source_max, f"lookback {cfg.lookback_days}d from {high_water}")


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


def is_due(cfg: TableConfig, now: datetime) -> bool:
    return cfg.next_refresh_at is None or cfg.next_refresh_at <= now
