"""Scale-out: slices on a real Dask cluster of worker processes.

- a LocalCluster of 2 worker processes (REFRESH_SLICE_WORKERS=2) loads a multi-slice table:
  the slices ran in both workers, none in this process, and Postgres equals the source
  (flows.engine.validation: per-period row counts and checksums);
- a bad slice among good ones: the later slices commit, the bad one does not; once the source
  is fixed, the next run loads exactly that slice and skips the others;
- the flow process killed mid-run while workers are loading: the orphaned workers commit
  nothing once the run's lock session is gone (the fence), and the next run skips exactly the
  slices committed, in whatever order they committed;
- two transactions of the same slice at once (a task run again while the first still runs):
  the second replaces the first's rows instead of adding to them.

Each test works in its own BigQuery dataset and raw schema (the extraction engine's fixture).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pyarrow as pa
import pytest
from google.cloud import bigquery

from flows.control import runs
from flows.core.planning import Slice
from flows.core.settings import get_settings
from flows.core.table_config import TableConfig
from flows.core.type_mapping import ColumnMapping
from flows.engine import scale_out
from flows.engine.load import apply_slice, ensure_raw_table
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.engine.validation.source_match import validate_table
from tests.integration.test_extraction_engine import (
    CONTROL,
    Engine,
    checkpoint_starts,
    engine,  # noqa: F401  (the fixture)
    locked_run,
    table_cfg,
)

S = bigquery.SchemaField
DAYS = 14
ROWS = 1_400
SCHEMA = [S("Id", "INT64"), S("Day", "DATE"), S("Amount", "NUMERIC"), S("Note", "STRING")]
FIRST = date(2026, 3, 2)  # a Monday
INSERT = f"""
insert into {{t}} (`Id`, `Day`, `Amount`, `Note`)
select n, date_add(date '{FIRST}', interval mod(n, {DAYS}) day), cast(n * 7 - 900 as numeric) / 100,
  if(mod(n, 9) = 0, null, concat('note ', cast(n as string), if(mod(n, 5) = 0, ' Zoë, "q"', '')))
from unnest(generate_array(0, {ROWS - 1})) as n
"""


def _cfg(name: str, **kw: Any) -> TableConfig:
    return table_cfg(
        name,
        "events",
        cursor_column="Day",
        custom_params={"key_columns": ["Id"]},
        **{"slice_size": "day", "lookback_days": 3, **kw},
    )


def _exact(e: Engine, cfg: TableConfig) -> None:
    """Postgres equals the source: every period's row count and checksum (flows.engine.validation)."""
    with e.pg() as conn:
        results = validate_table(e.clients, conn, cfg, e.raw)
    failed = [(r.period_start, r.bigquery, r.postgres) for r in results if not r.passed]
    assert not failed, failed
    assert sum(r.postgres.rows for r in results) == ROWS


def _refresh(e: Engine, cfg: TableConfig) -> tuple[TableOutcome, UUID]:
    with locked_run(e.settings) as run_id:
        return refresh_table(e.settings, e.clients, cfg, run_id, RefreshOptions()), run_id


def _loaded_by(e: Engine, table: str, run_id: UUID) -> set[date]:
    with e.pg() as conn:
        rows = conn.execute(
            f"select slice_start::date from {CONTROL}.slice_refreshes where table_name = %s "
            "and run_id = %s and status = 'success'",
            (table, run_id),
        ).fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Dask LocalCluster of 2 worker processes for the module; its scheduler's address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c.scheduler_address


def test_local_cluster_of_two_worker_processes_loads_exact_data(
    engine: Engine,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed import get_task_stream

    e = engine
    e.create_source("events", SCHEMA, INSERT)
    monkeypatch.setenv("REFRESH_SLICE_WORKERS", "2")
    settings = get_settings()
    e = Engine(settings, e.clients)
    cfg = _cfg("xt_local_events")
    with scale_out.slice_runner(settings) as runner:
        client = runner.client
        pids = client.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values(), pids
        with get_task_stream(client) as stream:
            outcome, run_id = _refresh(e, cfg)
    assert outcome.status == "success", outcome.error
    assert (outcome.slices_done, outcome.rows_inserted) == (DAYS, ROWS)
    ran_on = {t["worker"] for t in stream.data}
    assert len(stream.data) >= DAYS and len(ran_on) == 2, ran_on
    assert _loaded_by(e, "xt_local_events", run_id) == {FIRST + timedelta(days=i) for i in range(DAYS)}
    _exact(e, cfg)
    # the cluster lived as long as the block
    assert runner._cluster is not None and runner._cluster.status.name == "closed"


def test_resume_after_a_bad_slice_among_committed_ones_loads_exactly_that_slice(
    engine: Engine,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    cluster: str,
) -> None:
    """Day 2 fails, days 3..14 commit (out of order for a high-water mark): after the source
    is fixed, the next run loads day 2 alone, though it is far below the lookback window."""
    e = engine
    bad_day = FIRST + timedelta(days=1)
    e.create_source(
        "events",
        SCHEMA,
        INSERT.replace("concat('note '", "if(n = 29, code_points_to_string([0]), '') || concat('note '"),
    )
    monkeypatch.setenv("REFRESH_DASK_ADDRESS", cluster)
    e = Engine(get_settings(), e.clients)
    name = "xt_resume_events"
    cfg = _cfg(name)
    with scale_out.slice_runner(e.settings):
        first, _ = _refresh(e, cfg)
        assert first.status == "failed" and "1 slice(s) not loaded" in (first.error or ""), first.error
        assert checkpoint_starts(e, name) == {FIRST + timedelta(days=i) for i in range(DAYS)} - {bad_day}

        e.bq(f"update {e.path('events')} set `Note` = 'fixed' where `Id` = 29")
        second, run_id = _refresh(e, cfg)
    assert second.status == "success", second.error
    # the attempts a worker made reach the failed slice's audit row (not retried: bad data)
    with e.pg() as conn:
        failed = conn.execute(
            f"select attempts from {CONTROL}.slice_refreshes where table_name = %s and status = 'failed'",
            (name,),
        ).fetchall()
    assert failed == [(1,)], failed
    assert (second.slices_done, second.slices_skipped) == (1, DAYS - 1)
    assert _loaded_by(e, name, run_id) == {bad_day}
    _exact(e, cfg)


def test_retries_made_on_workers_are_counted_in_the_table_audit(
    engine: Engine,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    cluster: str,
) -> None:
    """The first three COPYs of a reload fail with a serialization failure (a transient error,
    retried by the slice on its worker): `table_refreshes.retries` counts them, as it does
    when slices run in the table's own thread."""
    e = engine
    e.create_source("events", SCHEMA, INSERT)
    monkeypatch.setenv("REFRESH_DASK_ADDRESS", cluster)
    e = Engine(get_settings(), e.clients)
    name = "xt_retry_events"
    cfg = _cfg(name)
    with scale_out.slice_runner(e.settings):
        first, _ = _refresh(e, cfg)  # creates the raw table
        assert first.status == "success", first.error
        with e.pg() as conn:
            # nextval is not rolled back with the failed COPY: exactly three first rows fail
            conn.execute(f"create sequence {e.raw}.xt_retry_seq")
            conn.execute(
                f"create function {e.raw}.xt_retry_fail() returns trigger language plpgsql as $$ begin "
                f"if nextval('{e.raw}.xt_retry_seq') <= 3 then "
                "raise exception 'could not serialize access' using errcode = '40001'; end if; "
                "return new; end $$"
            )
            conn.execute(
                f"create trigger fail_thrice before insert on {e.raw}.{name} "
                f"for each row execute function {e.raw}.xt_retry_fail()"
            )
        with locked_run(e.settings) as run_id:
            reload = refresh_table(e.settings, e.clients, cfg, run_id, RefreshOptions(start_date=FIRST))
    assert reload.status == "success", reload.error
    assert reload.slices_done == DAYS
    with e.pg() as conn:
        extra = _scalar(
            conn,
            f"select sum(attempts - 1) from {CONTROL}.slice_refreshes where run_id = %s",
            (run_id,),
        )
        counted = _scalar(
            conn,
            f"select retries from {CONTROL}.table_refreshes where run_id = %s and table_name = %s",
            (run_id, name),
        )
    assert extra == 3
    # plus any retry of the BigQuery client's own (none expected here)
    assert counted >= 3, counted
    _exact(e, cfg)


# The flow's side, as the flow runs it: lock, run row, slices on the Dask cluster it is given.
CHILD = """
import sys
from flows.engine import scale_out
from flows.control import runs
from flows.engine.bigquery import make_clients
from flows.engine.table_refresh import RefreshOptions, refresh_table
from flows.core.table_config import TableConfig
from flows.core.settings import get_settings

if __name__ == "__main__":
    settings = get_settings()
    clients = make_clients(settings)
    cfg = TableConfig.model_validate_json(sys.argv[1])
    with scale_out.slice_runner(settings), runs.refresh_lock(settings, wait_s=30) as conn:
        runs.mark_abandoned(conn, settings.control_schema)
        run = runs.start_run(conn, settings.control_schema, flow_run_id=None, trigger="test", params={})
        print("ready", run.run_id, flush=True)
        refresh_table(settings, clients, cfg, run.run_id, RefreshOptions())
"""


def _scalar(conn: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def test_flow_killed_mid_run_workers_commit_nothing_more_and_resume_skips_exactly_the_committed(
    engine: Engine,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    cluster: str,
    tmp_path: Any,
) -> None:
    e = engine
    e.create_source("events", SCHEMA, INSERT)
    name = "xt_flow_events"
    cfg = _cfg(name)
    # The flow's slices go to the module's cluster, whose workers outlive the flow.
    env = {**os.environ, "REFRESH_DASK_ADDRESS": cluster}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    in_flight_at_kill: list[int] = []
    with e.pg() as watch:
        for trial in range(2):
            before = checkpoint_starts(e, name)
            child = subprocess.Popen(
                [sys.executable, str(script), cfg.model_dump_json()],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                assert child.stdout is not None
                ready, run_id = child.stdout.readline().decode().split()
                assert ready == "ready", ready
                deadline = time.monotonic() + 240
                while len(checkpoint_starts(e, name) - before) < 2 + trial:
                    assert child.poll() is None and time.monotonic() < deadline, "no slice committed"
                    time.sleep(0.02)
                # The flow process dies; the workers go on with the slices they hold.
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=10)
                deadline = time.monotonic() + 15
                while _scalar(
                    watch,
                    "select count(*) from pg_stat_activity where application_name = %s",
                    (f"{runs.LOCK_SESSION_PREFIX}{run_id}",),
                ):
                    assert time.monotonic() < deadline, "the lock session outlived its process"
                    time.sleep(0.02)
                # Sessions of the workers still loading a slice (the flow's own are gone).
                in_flight_at_kill.append(
                    _scalar(
                        watch, "select count(*) from pg_stat_activity where application_name = 'sqp-refresh'"
                    )
                )
                # The barrier a taking-over run passes (mark_abandoned): after it, nothing of
                # the dead run may commit.
                runs.mark_abandoned(watch, CONTROL)
                committed = checkpoint_starts(e, name)
                time.sleep(4)  # the orphaned workers finish (or give up) the slices they hold
                assert checkpoint_starts(e, name) == committed, "a slice committed after the lock was lost"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
    # Informative only: whether a worker held a slice at the kill is down to timing (the test
    # below loses the lock with slices certainly in flight).
    print("worker sessions loading a slice when the flow was killed:", in_flight_at_kill)

    committed = checkpoint_starts(e, name)
    assert 0 < len(committed) < DAYS
    monkeypatch.setenv("REFRESH_DASK_ADDRESS", cluster)
    e = Engine(get_settings(), e.clients)
    with scale_out.slice_runner(e.settings):
        outcome, run_id = _refresh(e, cfg)
    assert outcome.status == "success", outcome.error
    everything = {FIRST + timedelta(days=i) for i in range(DAYS)}
    assert _loaded_by(e, name, run_id) == everything - committed
    assert outcome.slices_skipped == len(committed)
    _exact(e, cfg)


def test_lock_lost_mid_table_slices_on_workers_stop_at_the_fence(
    engine: Engine,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    cluster: str,
) -> None:
    """The run's lock session ends while its slices run on the workers: each slice checks the
    lock in its own transaction, so the ones that follow fail there and commit nothing."""
    e = engine
    e.create_source("events", SCHEMA, INSERT)
    monkeypatch.setenv("REFRESH_DASK_ADDRESS", cluster)
    e = Engine(get_settings(), e.clients)
    name = "xt_lock_events"
    cfg = _cfg(name)
    outcome: list[TableOutcome] = []
    with scale_out.slice_runner(e.settings), e.pg() as watch:
        with locked_run(e.settings) as run_id:
            worker = threading.Thread(
                target=lambda: outcome.append(
                    refresh_table(e.settings, e.clients, cfg, run_id, RefreshOptions())
                )
            )
            worker.start()
            deadline = time.monotonic() + 240
            while len(checkpoint_starts(e, name)) < 2:
                assert worker.is_alive() and time.monotonic() < deadline
                time.sleep(0.01)
            watch.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
                (f"{runs.LOCK_SESSION_PREFIX}{run_id}",),
            )
            runs.mark_abandoned(watch, CONTROL)  # the barrier a run taking over passes
            committed = checkpoint_starts(e, name)
            worker.join(300)
        assert not worker.is_alive()
        [lost] = outcome
        assert lost.status == "failed" and "lost the refresh lock" in (lost.error or ""), lost.error
        assert checkpoint_starts(e, name) == committed
        assert len(committed) < DAYS

        resumed, run_id = _refresh(e, cfg)
    assert resumed.status == "success", resumed.error
    assert _loaded_by(e, name, run_id) == {FIRST + timedelta(days=i) for i in range(DAYS)} - committed
    _exact(e, cfg)


def test_a_worker_killed_mid_run_its_slice_runs_again_elsewhere_and_data_is_exact(
    engine: Engine,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    cluster: str,
) -> None:
    e = engine
    e.create_source("events", SCHEMA, INSERT)
    monkeypatch.setenv("REFRESH_DASK_ADDRESS", cluster)
    e = Engine(get_settings(), e.clients)
    name = "xt_a_events"
    cfg = _cfg(name)
    outcome: list[TableOutcome] = []
    with scale_out.slice_runner(e.settings) as runner:
        pids = runner.client.run(os.getpid)
        with locked_run(e.settings) as run_id:
            flow = threading.Thread(
                target=lambda: outcome.append(
                    refresh_table(e.settings, e.clients, cfg, run_id, RefreshOptions())
                )
            )
            flow.start()
            deadline = time.monotonic() + 240
            while len(checkpoint_starts(e, name)) < 2:
                assert flow.is_alive() and time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(next(iter(pids.values())), signal.SIGKILL)  # its nanny starts a new one
            flow.join(300)
        assert not flow.is_alive()
    [done] = outcome
    assert done.status == "success", done.error
    assert done.slices_done == DAYS
    _exact(e, cfg)


def test_two_transactions_of_one_slice_at_once_leave_one_copy(engine: Engine) -> None:  # noqa: F811
    """The second waits for the first (flows.engine.load.SLICE_LOCK_KEY), then replaces its rows."""
    e = engine
    table = "xt_two_events"
    cols = [ColumnMapping("Id", "id", "INT64", "bigint"), ColumnMapping("Day", "day", "DATE", "date")]
    piece = Slice(FIRST, FIRST + timedelta(days=1))
    batch = pa.record_batch({"Id": pa.array(range(100), pa.int64()), "Day": pa.array([FIRST] * 100)})
    with e.pg() as conn, conn.transaction():
        ensure_raw_table(conn, e.raw, table, cols, "day")
    first_started, release = threading.Event(), threading.Event()

    def slow() -> Iterator[pa.RecordBatch]:
        yield batch
        first_started.set()
        release.wait(30)

    def apply(batches: Any) -> None:
        with psycopg.connect(e.settings.dsn()) as conn:
            apply_slice(
                conn,
                schema=e.raw,
                table=table,
                control_schema=CONTROL,
                columns=cols,
                cursor=cols[1],
                piece=piece,
                batches=batches,
                run_id=UUID(int=1),
                checkpoint_key=table,
            )

    first = threading.Thread(target=apply, args=(slow(),))
    first.start()
    assert first_started.wait(30)
    second = threading.Thread(target=apply, args=([batch],))
    second.start()
    time.sleep(1)  # the second is inside its transaction, waiting or (without the lock) copying
    release.set()
    first.join(30)
    second.join(30)
    with e.pg() as conn:
        assert _scalar(conn, f"select count(*) from {e.raw}.{table}") == 100
