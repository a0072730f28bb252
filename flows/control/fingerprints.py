"""Slice fingerprints in the control schema (change detection, flows.engine.change_detection).

A fingerprint is a row count and a checksum (flows.engine.fingerprinting computes them);
`Fingerprint` and a run's `PlanFingerprints` are plain values that a table's outcome
(flows.control.tables) carries from change detection to the validation after the refresh.
`checkpoints.source_rows/source_checksum` hold the fingerprint of the rows a slice's load
committed (written in the load's transaction); `source_as_of` the BigQuery time at which the
source was last known to hold exactly those rows; `loaded_xid` the load's transaction (the
validation after a refresh reuses the fingerprint of a slice whose rows all still carry it,
flows.engine.validation.source_match.unchanged_since_load). Slices found unchanged get a
`slice_refreshes` row with status `unchanged`, and the table's audit row the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control.checkpoints import END_PARAM, START_PARAM, bound
from flows.control.statuses import SliceStatus
from flows.core.db import qualified

_START = sql.Identifier("slice_start")


@dataclass(frozen=True)
class Fingerprint:
    rows: int
    checksum: int

    def __add__(self, other: Fingerprint) -> Fingerprint:
        return Fingerprint(self.rows + other.rows, self.checksum + other.checksum)


EMPTY = Fingerprint(0, 0)


@dataclass(frozen=True)
class PlanFingerprints:
    """BigQuery's fingerprints that change detection took, before reading, of the slices a run
    then read (flows.engine.change_detection.detect): by slice start (None: the whole table), each
    the source's state at `as_of`. Kept on the table's outcome for the validation step, which
    reuses them when its own `signature` (flows.engine.fingerprinting) is the same instead of
    asking BigQuery again."""

    signature: str
    periods: dict[date | None, Fingerprint]
    as_of: datetime | None


@dataclass(frozen=True)
class Stored:
    """A checkpoint's fingerprint; rows/checksum None: loaded without one."""

    rows: int | None
    checksum: int | None
    as_of: datetime | None


def _day(ts: datetime | None) -> date | None:
    return None if ts is None else ts.astimezone(UTC).date()


def stored(conn: psycopg.Connection, schema: str, key: str) -> dict[date | None, Stored]:
    """Every checkpoint of `key` (a table, or `shadow:<table>`), by slice start (None: whole table)."""
    rows = conn.execute(
        sql.SQL(
            "select {start}, source_rows, source_checksum, source_as_of from {cp} where table_name = %s"
        ).format(start=bound(_START), cp=qualified(schema, "checkpoints")),
        (key,),
    ).fetchall()
    return {
        _day(start): Stored(n, None if checksum is None else int(checksum), as_of)
        for start, n, checksum, as_of in rows
    }


def store(
    conn: psycopg.Connection,
    schema: str,
    key: str,
    slice_start: datetime | None,
    rows: int | None,
    checksum: int | None,
    as_of: datetime | None,
) -> None:
    """Set the fingerprint of a checkpoint written in the same transaction (load.apply_slice),
    and that transaction's id with it (none without a fingerprint)."""
    conn.execute(
        sql.SQL(
            "update {} set source_rows = %s, source_checksum = %s, source_as_of = %s, "
            "loaded_xid = case when %s::bigint is null then null else pg_current_xact_id() end "
            "where table_name = %s and slice_start = {start}"
        ).format(qualified(schema, "checkpoints"), start=START_PARAM),
        (rows, checksum, as_of, rows, key, slice_start),
    )


def confirm(
    conn: psycopg.Connection, schema: str, key: str, slice_starts: list[datetime | None], as_of: datetime
) -> None:
    """The source still held exactly the checkpointed rows at `as_of` (fingerprints equal)."""
    if not slice_starts:
        return
    # One statement for many slices: START_PARAM's mapping (None: the whole table) per element.
    conn.execute(
        sql.SQL(
            "update {} set source_as_of = greatest(source_as_of, %s) where table_name = %s "
            "and slice_start in (select coalesce(s, '-infinity') from unnest(%s::timestamptz[]) s)"
        ).format(qualified(schema, "checkpoints")),
        (as_of, key, slice_starts),
    )


@dataclass(frozen=True)
class Loaded:
    """A slice a run loaded with its fingerprint: by slice start (None: whole table)."""

    start: date | None
    end: date | None
    rows: int
    checksum: int
    xid: int  # the loading transaction's 64-bit id


def loaded_by(conn: psycopg.Connection, schema: str, key: str, run_id: UUID) -> tuple[list[Loaded], int]:
    """The slices of `key` last loaded by `run_id` with a fingerprint, and the next transaction
    id now (how old each load is, in transactions)."""
    rows = conn.execute(
        sql.SQL(
            "select {start}, {end}, source_rows, source_checksum, loaded_xid::text from {cp} "
            "where table_name = %s and run_id = %s and loaded_xid is not null and source_rows is not null"
        ).format(
            start=bound(_START),
            end=bound(sql.Identifier("slice_end")),
            cp=qualified(schema, "checkpoints"),
        ),
        (key, run_id),
    ).fetchall()
    now = conn.execute("select pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert now is not None
    out = [
        Loaded(_day(start), _day(end), int(n), int(checksum), int(xid))
        for start, end, n, checksum, xid in rows
    ]
    return out, int(now[0])


@dataclass(frozen=True)
class UnchangedSlice:
    slice_start: datetime | None  # None: the whole table
    slice_end: datetime | None
    reason: str


def record_unchanged(
    conn: psycopg.Connection,
    schema: str,
    run_id: UUID,
    table: str,
    slices: list[UnchangedSlice],
    started_at: datetime,
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "insert into {} (run_id, table_name, slice_start, slice_end, status, change_reason, "
                "started_at) values (%s, %s, {start}, {end}, %s, %s, %s)"
            ).format(qualified(schema, "slice_refreshes"), start=START_PARAM, end=END_PARAM),
            [
                (run_id, table, s.slice_start, s.slice_end, SliceStatus.UNCHANGED, s.reason, started_at)
                for s in slices
            ],
        )


def note_reason(
    conn: psycopg.Connection, schema: str, run_id: UUID, table: str, slice_start: datetime | None, reason: str
) -> None:
    conn.execute(
        sql.SQL(
            "update {} set change_reason = %s where run_id = %s and table_name = %s "
            "and slice_start = {start} and status = 'success'"
        ).format(qualified(schema, "slice_refreshes"), start=START_PARAM),
        (reason, run_id, table, slice_start),
    )


def record_cost(
    conn: psycopg.Connection, schema: str, run_id: UUID, table: str, fingerprint_bytes: int, unchanged: int
) -> None:
    """On the table's audit row (written when its refresh started)."""
    conn.execute(
        sql.SQL(
            "update {} set fingerprint_bytes = %s, slices_unchanged = %s "
            "where run_id = %s and table_name = %s"
        ).format(qualified(schema, "table_refreshes")),
        (fingerprint_bytes, unchanged, run_id, table),
    )
