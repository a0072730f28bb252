"""Change detection: fingerprint a table's slices in BigQuery before reading, skip the unchanged.

For the slices a run plans, one BigQuery query returns per day its row count and checksum
(flows.engine.fingerprinting.fingerprint_bq: the validation feature's normal form and summed row hashes;
no row leaves BigQuery), summed per slice. Each checkpoint holds the fingerprint of the rows
its load committed, computed by Postgres over the loaded rows in the load's own transaction
(flows.engine.fingerprinting.fingerprint_pg), so it never claims a row the load did not contain, even if
the source changed between the fingerprint query and the read. Equal fingerprints: the slice
is not read (`unchanged` in the slice audit); otherwise it is read and applied.

Before the checksum, partition metadata (INFORMATION_SCHEMA.PARTITIONS, a metadata query) can
already prove a slice unchanged: every partition of the slice last modified before the time its
checkpoint's rows were last known to be the source's (`source_as_of`, BigQuery's clock), and
their rows adding up to the checkpoint's. The emulator reports the table's modification time
for every partition, so this step is off against it (the checksum decides there).

`decide` and `partitions_unchanged` are pure; `detect` reads (BigQuery, the checkpoints) and
writes nothing; `record` writes the audit of what was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import psycopg
from google.cloud import bigquery

from flows.control import fingerprints
from flows.control.fingerprints import EMPTY, Fingerprint, PlanFingerprints, Stored, UnchangedSlice
from flows.core.db import relation_columns
from flows.core.identifiers import bq_quote
from flows.core.planning import Slice
from flows.core.settings import Settings
from flows.core.table_config import ChangeDetection, SliceSize, TableConfig
from flows.engine.bigquery import BigQueryClients, classify
from flows.engine.extract import SourceTable
from flows.engine.fingerprinting import (
    QueryStats,
    by_period,
    cursor_of,
    estimate_fingerprint_bytes,
    fingerprint_bq,
    fingerprint_pg,
    signature,
)
from flows.engine.normal_form import Col, columns_of


class Change(StrEnum):
    NEW = "new"  # no checkpoint: read
    CHANGED = "changed"  # the source differs from what the checkpoint loaded: read
    UNCHANGED = "unchanged"  # not read
    RELOAD = "reload"  # read without looking (full refresh, a requested range, detection off)


@dataclass(frozen=True)
class SliceDecision:
    piece: Slice
    change: Change
    reason: str
    # Unchanged by equal checksums (not by partition metadata): the source held the checkpoint's
    # rows when the fingerprint query ran.
    checksum_equal: bool = False

    @property
    def read(self) -> bool:
        return self.change is not Change.UNCHANGED

    def to_dict(self) -> dict[str, Any]:
        return {"slice": self.piece.label, "change": self.change.value, "reason": self.reason}


def bypass_reason(cfg: TableConfig, *, full_refresh: bool, explicit_range: bool) -> str | None:
    """Why every slice is read without fingerprinting (None: fingerprint them).

    `--force` is not here: it only makes a table due; its slices are still compared.
    """
    if full_refresh:
        return "full refresh reads every slice"
    if explicit_range:
        return "a requested date range (backfill) reads every slice in it"
    if cfg.change_detection is ChangeDetection.OFF:
        return "change_detection is off for this table"
    return None


def blind_reason(cols: list[Col]) -> str | None:
    """The checksum sees only NULL or not of JSON, RECORD, ARRAY, GEOGRAPHY... columns (no normal
    form is canonical on both engines): a change in one would go unseen, so such a table is read
    whole every time."""
    blind = [c.source.name for c in cols if c.kind == "UNCHECKED"]
    if not blind:
        return None
    return (
        f"columns {', '.join(blind)} are outside the checksum (JSON, RECORD, ARRAY...): every slice is read"
    )


def decide(
    slices: list[Slice],
    stored: dict[date | None, Stored],
    source: dict[date | None, Fingerprint],
    partition_unchanged: set[date | None] | None = None,
    bypass: str | None = None,
) -> list[SliceDecision]:
    """Per slice: read it or not, and why.

    `stored`: the checkpoints' fingerprints by slice start; `source`: BigQuery's fingerprints by
    slice start (a slice absent there holds no rows); `partition_unchanged`: slices partition
    metadata proved unchanged (they need no checksum).
    """
    out = []
    for s in slices:
        cp = stored.get(s.start)
        if bypass is not None:
            out.append(SliceDecision(s, Change.RELOAD, bypass))
        elif cp is None:
            out.append(SliceDecision(s, Change.NEW, "no checkpoint"))
        elif partition_unchanged and s.start in partition_unchanged:
            out.append(SliceDecision(s, Change.UNCHANGED, f"partitions unchanged since {cp.as_of}"))
        elif cp.rows is None or cp.checksum is None:
            out.append(SliceDecision(s, Change.CHANGED, "checkpoint has no fingerprint"))
        else:
            now = source.get(s.start, EMPTY)
            if now.rows != cp.rows:
                out.append(
                    SliceDecision(s, Change.CHANGED, f"fingerprint differs: rows {cp.rows}->{now.rows}")
                )
            elif now.checksum != cp.checksum:
                out.append(
                    SliceDecision(
                        s, Change.CHANGED, f"fingerprint differs: checksum differs ({now.rows} rows)"
                    )
                )
            else:
                out.append(SliceDecision(s, Change.UNCHANGED, f"fingerprint equal ({now.rows} rows)", True))
    return out


@dataclass(frozen=True)
class Partition:
    partition_id: str  # YYYYMMDD, YYYYMMDDHH, YYYYMM; __NULL__, __UNPARTITIONED__
    total_rows: int
    last_modified: datetime


_ID_FORMATS = {"DAY": "%Y%m%d", "HOUR": "%Y%m%d%H", "MONTH": "%Y%m"}


def partitions_usable(source: SourceTable, cursor: Col | None, size: SliceSize) -> bool:
    """The table is time-partitioned on the cursor, each partition inside one slice."""
    if source.partitioning is None or cursor is None:
        return False
    column, granularity = source.partitioning
    if column.lower() != cursor.source.name.lower() or granularity not in _ID_FORMATS:
        return False
    return granularity != "MONTH" or size is SliceSize.MONTH


def partitions_unchanged(
    slices: list[Slice], stored: dict[date | None, Stored], partitions: list[Partition], granularity: str
) -> set[date | None]:
    """Slices whose partitions all were last modified before the checkpoint's `as_of` and hold
    the checkpoint's row count (a partition deleted whole is missing: the count differs)."""
    if any(p.partition_id == "__UNPARTITIONED__" for p in partitions):
        return set()  # rows still in the streaming buffer: the metadata is not complete
    fmt = _ID_FORMATS[granularity]
    days = [
        (datetime.strptime(p.partition_id, fmt).date(), p) for p in partitions if p.partition_id != "__NULL__"
    ]
    out: set[date | None] = set()
    for s in slices:
        cp = stored.get(s.start)
        if s.start is None or s.end is None or cp is None or cp.as_of is None or cp.rows is None:
            continue
        inside = [p for d, p in days if s.start <= d < s.end]
        if all(p.last_modified < cp.as_of for p in inside) and sum(p.total_rows for p in inside) == cp.rows:
            out.add(s.start)
    return out


def read_partitions(clients: BigQueryClients, source_table: str) -> list[Partition]:
    """INFORMATION_SCHEMA.PARTITIONS of the table (metadata: no table data is scanned)."""
    path = bq_quote(f"{clients.project}.{clients.dataset}") + ".INFORMATION_SCHEMA.PARTITIONS"
    config = clients.query_config(
        query_parameters=[bigquery.ScalarQueryParameter("t", "STRING", source_table)]
    )
    try:
        rows = clients.rest.query(
            "select partition_id, total_rows, last_modified_time " + f"from {path} where table_name = @t",
            job_config=config,
        ).result()
        return [Partition(str(r[0]), int(r[1] or 0), r[2]) for r in rows if r[0] is not None]
    except Exception as exc:
        raise classify(exc, f"{source_table}: partition metadata") from exc


@dataclass
class Detection:
    """What `detect` found for one table, and what the loads need to store their fingerprint."""

    decisions: list[SliceDecision] = field(default_factory=list)
    cols: list[Col] = field(default_factory=list)
    cursor: Col | None = None
    size: SliceSize | None = None
    # BigQuery's start time of the fingerprint query: the read of every slice comes after it.
    as_of: datetime | None = None
    bytes_estimated: int = 0
    enabled: bool = True  # False: change_detection off, checkpoints get no fingerprint
    # BigQuery's fingerprint at `as_of` of each slice the query covered (EMPTY: no rows).
    source: dict[date | None, Fingerprint] = field(default_factory=dict)
    # The days holding rows in BigQuery at `as_of`, of each dated slice the query covered (its
    # figures are per day): with the raw table's days, the days a load of the slice changes
    # (what --explain tells dbt's periods from).
    source_days: dict[date, list[date]] = field(default_factory=dict)

    @property
    def to_read(self) -> list[Slice]:
        return [d.piece for d in self.decisions if d.read]

    def plan_fingerprints(self) -> PlanFingerprints | None:
        """The source's fingerprints of the slices to read, for the validation after the load."""
        read = {s.start: self.source[s.start] for s in self.to_read if s.start in self.source}
        if not read:
            return None
        return PlanFingerprints(signature(self.cols, self.cursor, self.size), read, self.as_of)

    @property
    def unchanged(self) -> list[SliceDecision]:
        return [d for d in self.decisions if not d.read]


def detect(
    settings: Settings,
    clients: BigQueryClients,
    conn: psycopg.Connection,
    cfg: TableConfig,
    source: SourceTable,
    raw_schema: str,
    key: str,
    slices: list[Slice],
    bypass: str | None,
    validated_after: bool = False,
) -> Detection:
    """Decide which of `slices` to read. Reads BigQuery and the checkpoints; writes nothing.

    `validated_after`: the run validates what it loads
    (flows.engine.validation.after_refresh.validate_touched), so the slices without a
    fingerprint to compare (new ones) are fingerprinted in the same query too: the validation
    then reuses that figure instead of reading them again.
    """
    cols = columns_of(source, clients.settings.uses_emulator)
    cursor, size = cursor_of(cfg, source, cols)
    blind = blind_reason(cols)
    det = Detection(
        cols=cols,
        cursor=cursor,
        size=size,
        enabled=cfg.change_detection is ChangeDetection.CHECKSUM and blind is None,
    )
    # Checkpoints without their raw table (dropped by hand): nothing they describe is there.
    missing = None if relation_columns(conn, raw_schema, cfg.table_name) else "the raw table does not exist"
    bypass = bypass or blind or missing
    if bypass is not None or not slices:
        det.decisions = decide(slices, {}, {}, bypass=bypass)
        return det
    stored = fingerprints.stored(conn, settings.control_schema, key)
    by_partition: set[date | None] = set()
    if not settings.uses_emulator and size is not None and partitions_usable(source, cursor, size):
        assert source.partitioning is not None
        by_partition = partitions_unchanged(
            slices, stored, read_partitions(clients, cfg.source_table), source.partitioning[1]
        )
    # Only slices with a fingerprint to compare need the checksum (and, validated after, those
    # that will be read anyway); one query over their span.
    compare = [
        s
        for s in slices
        if s.start not in by_partition
        and (validated_after or ((cp := stored.get(s.start)) is not None and cp.rows is not None))
    ]
    fps: dict[date | None, Fingerprint] = {}
    if compare:
        span = Slice(compare[0].start, compare[-1].end) if cursor is not None else None
        det.bytes_estimated = estimate_fingerprint_bytes(clients, cfg.source_table, cols, cursor, span)
        stats = QueryStats()
        days = fingerprint_bq(
            clients, cfg.source_table, cols, cursor, span, stats, what="change detection fingerprints"
        )
        fps = by_period(days, size)
        det.as_of = stats.started_at.astimezone(UTC) if stats.started_at else None
        # Every slice inside the queried span is fingerprinted whole, compared or not.
        covered = [s for s in slices if span is None or s.within(span)]
        det.source = {s.start: fps.get(s.start, EMPTY) for s in covered}
        det.source_days = {
            s.start: sorted(d for d, fp in days.items() if d is not None and s.start <= d < s.end and fp.rows)
            for s in covered
            if s.start is not None and s.end is not None
        }
    det.decisions = decide(slices, stored, fps, by_partition)
    return det


def loaded_fingerprint(
    conn: psycopg.Connection, schema: str, table: str, det: Detection, piece: Slice
) -> Fingerprint:
    """The fingerprint of the slice's rows as they stand in `conn`'s transaction (just loaded)."""
    window = piece if det.cursor is not None and piece.start is not None else None
    days = fingerprint_pg(conn, schema, table, det.cols, det.cursor, window)
    return sum(days.values(), EMPTY)


def store_loaded(
    conn: psycopg.Connection,
    control_schema: str,
    schema: str,
    table: str,
    key: str,
    det: Detection,
    piece: Slice,
) -> None:
    """In the load's transaction, after its checkpoint: the fingerprint of what it committed
    (with change detection off: none, so an older one never outlives the rows it described)."""
    if not det.enabled:
        fingerprints.store(conn, control_schema, key, piece.start_ts, None, None, None)
        return
    fp = loaded_fingerprint(conn, schema, table, det, piece)
    fingerprints.store(conn, control_schema, key, piece.start_ts, fp.rows, fp.checksum, det.as_of)


def note_read(
    conn: psycopg.Connection, control_schema: str, run_id: UUID, table: str, det: Detection, piece: Slice
) -> None:
    """Why the slice was read, on its audit row (written in the same transaction)."""
    reason = next((f"{d.change.value}: {d.reason}" for d in det.decisions if d.piece == piece), None)
    if reason is not None:
        fingerprints.note_reason(conn, control_schema, run_id, table, piece.start_ts, reason)


def record(
    conn: psycopg.Connection,
    control_schema: str,
    run_id: UUID,
    table: str,
    key: str,
    det: Detection,
    started_at: datetime,
) -> None:
    """The unchanged slices' audit rows, their confirmed `as_of`, and the table's cost; one transaction."""
    unchanged = det.unchanged
    with conn.transaction():
        fingerprints.record_unchanged(
            conn,
            control_schema,
            run_id,
            table,
            [UnchangedSlice(d.piece.start_ts, d.piece.end_ts, d.reason) for d in unchanged],
            started_at,
        )
        if det.as_of is not None:
            confirmed = [d.piece.start_ts for d in unchanged if d.checksum_equal]
            fingerprints.confirm(conn, control_schema, key, confirmed, det.as_of)
        fingerprints.record_cost(conn, control_schema, run_id, table, det.bytes_estimated, len(unchanged))
