"""The statuses of table and slice refreshes, as stored (`table_refreshes.status`,
`slice_refreshes.status`); each column's check constraint allows exactly its enum's values."""

from __future__ import annotations

from enum import StrEnum


class TableStatus(StrEnum):
    """`table_refreshes.status`: planned is a dry run's, skipped a table left out of a run."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    PLANNED = "planned"


class SliceStatus(StrEnum):
    """`slice_refreshes.status`."""

    SUCCESS = "success"
    FAILED = "failed"
    UNCHANGED = "unchanged"  # fingerprint equal to its checkpoint's: not read (flows.engine.change_detection)
