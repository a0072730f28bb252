"""Postgres refuses a slice's COPY (disk full, a read-only raw table).

Disk full cannot be made honestly here without root tricks the CI machine may not allow (a
tablespace on a tiny tmpfs or loop device), so a BEFORE INSERT trigger on the raw table raises
the very errors Postgres raises: SQLSTATE 53100 disk_full ("could not extend file ... No space
left on device") and 25006 read_only_sql_transaction. COPY fires the trigger on its first row,
after the slice's DELETE, inside the slice's transaction: the slice must roll back whole (the
rows it deleted are back), the error must name the table and the slice, and the run's other
table must load.
"""

from __future__ import annotations

import pytest

from flows.core.settings import get_settings
from flows.engine.table_refresh import RefreshOptions, refresh_table
from tests.integration import test_extraction_engine as xt
from tests.integration.test_extraction_engine import CONTROL, Engine, locked_run, table_cfg
from tests.integration.test_faults import BIG_INSERT, BIG_SCHEMA

pytestmark = pytest.mark.faults

engine = xt.engine

RAISES = {
    "diskfull": ("53100", 'could not extend file "base/16384/24576": No space left on device'),
    "readonly": ("25006", "cannot execute INSERT in a read-only transaction"),
}


@pytest.mark.parametrize("fault", sorted(RAISES))
def test_copyfault_rolls_the_slice_back_names_table_and_slice_other_table_loads(
    engine: Engine, fault: str
) -> None:
    e = engine
    small = BIG_INSERT.replace("3999", "399")  # 4 days x 100 rows
    e.create_source("hit", BIG_SCHEMA, small)
    e.create_source("other", BIG_SCHEMA, small)
    # change detection off: the second refresh must read (and COPY) the unchanged slices again
    hit = table_cfg(
        f"xt_copyfault_hit_{fault}", "hit", cursor_column="Day", slice_size="day", change_detection="off"
    )
    other = table_cfg(f"xt_copyfault_other_{fault}", "other", cursor_column="Day", slice_size="day")
    assert e.refresh(hit).status == "success"
    raw = f"{e.raw}.{hit.table_name}"
    state, message = RAISES[fault]
    with e.pg() as conn:
        before = conn.execute(f"select count(*), sum(length(payload)) from {raw}").fetchone()
        conn.execute(
            "create function xt_copyfault_refuse() returns trigger language plpgsql as $$ begin "
            f"raise exception using errcode = '{state}', message = '{message}'; end $$"
        )
        conn.execute(
            f"create trigger refuse before insert on {raw} for each row execute function xt_copyfault_refuse()"
        )
    settings = get_settings(table_retry_budget_s=5.0)
    try:
        with locked_run(settings) as run_id:
            failed = refresh_table(settings, e.clients, hit, run_id, RefreshOptions(full_refresh=False))
            loaded = refresh_table(settings, e.clients, other, run_id, RefreshOptions())
    finally:
        with e.pg() as conn:
            conn.execute(f"drop trigger refuse on {raw}")
            conn.execute("drop function xt_copyfault_refuse()")
    err = failed.error or ""
    print(fault, "->", err)
    assert failed.status == "failed"
    assert "\n" not in err
    assert hit.table_name in err and "slice 2026-02-01" in err, err
    assert message.split(":")[0] in err, err
    # The slice's DELETE rolled back with its COPY: the table holds what it held.
    with e.pg() as conn:
        assert conn.execute(f"select count(*), sum(length(payload)) from {raw}").fetchone() == before
        slices = conn.execute(
            f"select status, attempts, error from {CONTROL}.slice_refreshes where run_id = %s and table_name = %s",
            (run_id, hit.table_name),
        ).fetchall()
    assert [s[0] for s in slices] == ["failed"], slices
    assert hit.table_name in slices[0][2] and "2026-02-01" in slices[0][2]
    assert loaded.status == "success", loaded.error
    assert loaded.rows_inserted == 400
