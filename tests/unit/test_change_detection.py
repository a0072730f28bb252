"""Change detection's decisions (flows.engine.change_detection.decide, partitions_unchanged): pure."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from flows.control.fingerprints import EMPTY, Fingerprint, Stored
from flows.core.planning import Slice, slices_between
from flows.core.table_config import ChangeDetection, SliceSize, TableConfig
from flows.engine.change_detection import (
    Change,
    Detection,
    Partition,
    blind_reason,
    bypass_reason,
    decide,
    partitions_unchanged,
)
from flows.engine.extract import SourceColumn, SourceTable
from flows.engine.fingerprinting import signature
from flows.engine.normal_form import columns_of

W = slices_between(date(2026, 3, 2), date(2026, 3, 29), SliceSize.WEEK)  # four ISO weeks
AS_OF = datetime(2026, 3, 30, 6, tzinfo=UTC)


def _stored(rows: int, checksum: int, as_of: datetime | None = AS_OF) -> Stored:
    return Stored(rows, checksum, as_of)


def test_each_kind_of_change_and_its_reason() -> None:
    stored = {
        W[0].start: _stored(10, 111),
        W[1].start: _stored(10, 222),
        W[2].start: _stored(10, 333),
    }
    source = {
        W[0].start: Fingerprint(10, 111),  # unchanged
        W[1].start: Fingerprint(10, 999),  # a value restated: same count, other checksum
        W[2].start: Fingerprint(7, 300),  # rows deleted
        W[3].start: Fingerprint(5, 50),  # new week
    }
    got = decide(W, stored, source)
    assert [(d.change, d.reason) for d in got] == [
        (Change.UNCHANGED, "fingerprint equal (10 rows)"),
        (Change.CHANGED, "fingerprint differs: checksum differs (10 rows)"),
        (Change.CHANGED, "fingerprint differs: rows 10->7"),
        (Change.NEW, "no checkpoint"),
    ]
    assert [d.read for d in got] == [False, True, True, True]
    assert got[0].checksum_equal and not any(d.checksum_equal for d in got[1:])


def test_a_slice_emptied_in_the_source_is_changed_and_an_empty_one_stays_unchanged() -> None:
    stored = {W[0].start: _stored(4, 40), W[1].start: _stored(0, 0)}
    got = decide(W[:2], stored, {})
    assert [(d.change, d.reason) for d in got] == [
        (Change.CHANGED, "fingerprint differs: rows 4->0"),
        (Change.UNCHANGED, "fingerprint equal (0 rows)"),
    ]


def test_a_checkpoint_without_fingerprint_is_read() -> None:
    got = decide(W[:1], {W[0].start: Stored(None, None, None)}, {W[0].start: Fingerprint(1, 1)})
    assert (got[0].change, got[0].reason) == (Change.CHANGED, "checkpoint has no fingerprint")


def test_bypass_reads_every_slice_whatever_the_fingerprints() -> None:
    stored = {s.start: _stored(1, 1) for s in W}
    source = {s.start: Fingerprint(1, 1) for s in W}
    got = decide(W, stored, source, bypass="full refresh reads every slice")
    assert {d.change for d in got} == {Change.RELOAD} and all(d.read for d in got)


def test_bypass_reasons() -> None:
    cfg = TableConfig(table_name="t", source_table="t", cursor_column="d")
    assert bypass_reason(cfg, full_refresh=False, explicit_range=False) is None
    assert "full refresh" in (bypass_reason(cfg, full_refresh=True, explicit_range=False) or "")
    assert "backfill" in (bypass_reason(cfg, full_refresh=False, explicit_range=True) or "")
    off = cfg.model_copy(update={"change_detection": ChangeDetection.OFF})
    assert "off" in (bypass_reason(off, full_refresh=False, explicit_range=False) or "")


def test_whole_table_slice_is_keyed_by_none() -> None:
    whole = [Slice(None, None)]
    assert decide(whole, {None: _stored(3, 9)}, {None: Fingerprint(3, 9)})[0].change is Change.UNCHANGED
    assert decide(whole, {None: _stored(3, 9)}, {None: Fingerprint(3, 8)})[0].change is Change.CHANGED


def _days(week: Slice, rows: int, modified: datetime) -> list[Partition]:
    assert week.start is not None
    return [Partition((week.start + timedelta(days=i)).strftime("%Y%m%d"), rows, modified) for i in range(7)]


def test_partitions_prove_unchanged_only_when_older_than_as_of_and_rows_match() -> None:
    before, after = AS_OF - timedelta(hours=1), AS_OF + timedelta(hours=1)
    stored = {
        W[0].start: _stored(70, 1),
        W[1].start: _stored(70, 1),
        W[2].start: _stored(70, 1),
        W[3].start: _stored(70, 1, as_of=None),
    }
    assert W[2].start is not None
    parts = (
        _days(W[0], 10, before)
        + _days(W[1], 10, before)[:6]  # a day deleted whole: 60 rows, not 70
        + _days(W[2], 10, before)[:6]
        + [Partition((W[2].start + timedelta(days=6)).strftime("%Y%m%d"), 10, after)]  # modified since
        + _days(W[3], 10, before)
        + [Partition("__NULL__", 5, after)]
    )
    assert partitions_unchanged(W, stored, parts, "DAY") == {W[0].start}
    got = decide(W, stored, {}, partitions_unchanged(W, stored, parts, "DAY"))
    assert got[0].change is Change.UNCHANGED and not got[0].checksum_equal
    assert got[0].reason.startswith("partitions unchanged since")


def test_streaming_buffer_disables_the_partition_shortcut() -> None:
    stored = {W[0].start: _stored(70, 1)}
    parts = [*_days(W[0], 10, AS_OF - timedelta(days=1)), Partition("__UNPARTITIONED__", 3, AS_OF)]
    assert partitions_unchanged(W[:1], stored, parts, "DAY") == set()


def test_hourly_partitions() -> None:
    day = Slice(date(2026, 3, 2), date(2026, 3, 3))
    parts = [Partition(f"20260302{h:02d}", 1, AS_OF - timedelta(days=1)) for h in range(24)]
    assert partitions_unchanged([day], {day.start: _stored(24, 1)}, parts, "HOUR") == {day.start}


def test_a_table_with_columns_outside_the_checksum_is_read_whole() -> None:
    def table(*types: tuple[str, str]) -> SourceTable:
        return SourceTable(
            "t",
            [SourceColumn(n, t, m, None, None) for n, (t, m) in zip("abc", types, strict=True)],
            None,
            None,
        )

    plain = table(("DATE", "NULLABLE"), ("NUMERIC", "NULLABLE"), ("STRING", "NULLABLE"))
    assert blind_reason(columns_of(plain, False)) is None
    nested = table(("DATE", "NULLABLE"), ("JSON", "NULLABLE"), ("STRING", "REPEATED"))
    reason = blind_reason(columns_of(nested, False))
    assert reason is not None and "columns b, c are outside the checksum" in reason


def test_the_plan_hands_on_the_source_fingerprints_of_the_slices_it_reads() -> None:
    cols = columns_of(
        SourceTable("t", [SourceColumn("Date", "DATE", "NULLABLE", None, None)], None, None), False
    )
    stored = {W[0].start: _stored(10, 111), W[1].start: _stored(10, 222)}
    # The query covered W0..W2 (W2 empty in the source); W3 has no checkpoint and was not queried.
    source = {W[0].start: Fingerprint(10, 111), W[1].start: Fingerprint(10, 999), W[2].start: EMPTY}
    det = Detection(decide(W, stored, source), cols, cols[0], SliceSize.WEEK, AS_OF, source=source)
    plan = det.plan_fingerprints()
    assert plan is not None and plan.as_of == AS_OF
    # W0 is not read (unchanged): not needed; W3 is read but was never fingerprinted.
    assert plan.periods == {W[1].start: Fingerprint(10, 999), W[2].start: EMPTY}
    assert plan.signature == signature(cols, cols[0], SliceSize.WEEK)
    # Another normal form, cursor or period size is another signature: the plan is not reused.
    other = columns_of(
        SourceTable("t", [SourceColumn("Date", "TIMESTAMP", "NULLABLE", None, None)], None, None), False
    )
    assert (
        len(
            {
                plan.signature,
                signature(other, other[0], SliceSize.WEEK),
                signature(cols, cols[0], SliceSize.DAY),
            }
        )
        == 3
    )
    assert Detection(decide(W, {}, {}, bypass="full refresh"), cols, source={}).plan_fingerprints() is None
