"""Which raw tables the flow vacuums after a run (flows.engine.maintenance.changed_raw_tables)."""

from __future__ import annotations

from flows.core.settings import Settings
from flows.engine.maintenance import changed_raw_tables


def test_only_tables_whose_run_deleted_rows_are_vacuumed_in_their_schema() -> None:
    settings = Settings(raw_schema="raw")
    changed = [
        ("sqp", "live", 1_000),  # slices replaced
        ("first", "live", 0),  # a first load: nothing dead
        ("shadowed", "shadow", 5),  # loads into raw_shadow
        ("planned", "dry_run", 9),  # wrote nothing
    ]
    assert changed_raw_tables(settings, changed) == [("raw", "sqp"), ("raw_shadow", "shadowed")]
