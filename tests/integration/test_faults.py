"""Faults in the middle of a run, against real Postgres and the BigQuery emulator.

- lock loss: the refresh lock's session ends mid-run (as on a Postgres restart or failover) and a
  second run starts: the first commits no slice after the loss and fails with a clear error;
- BigQuery stalls or dies mid-read (through tests/faults.py's proxy): the stall is detected
  within REFRESH_BQ_STALL_TIMEOUT_S, the table fails within its retry budget naming endpoint,
  project, table and slice, the next table loads and the lock is free at once;
- a NUL character in a source string fails its slice only, naming table, slice, column, row;
- Postgres stopped and started again mid-run: `refresh run` prints one error line, no
  traceback, and the run's row ends `failed`.

Tables are named `xt_...` in their own datasets and raw schemas, like test_extraction_engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from flows.control import history, runs
from flows.core.db import FENCE_LOCK_KEY
from flows.core.errors import TransientError
from flows.core.settings import get_settings
from flows.demo.local_stack import EmbeddedPostgres, free_port
from flows.engine.bigquery import make_clients
from flows.engine.extract import ReadStats, read_storage
from flows.engine.table_refresh import RefreshOptions, refresh_table
from tests.faults import FaultProxy
from tests.integration import test_extraction_engine as xt
from tests.integration.test_extraction_engine import (
    CONTROL,
    CRASH_CHILD,
    CRASH_INSERT,
    CRASH_SCHEMA,
    Engine,
    S,
    bq_checksums,
    locked_run,
    pg_checksums,
    table_cfg,
)

engine = xt.engine  # the same isolated engine per test (dataset and raw schema `xt_<word>`)


def _scalar(conn: psycopg.Connection, query: str, params: tuple[object, ...] = ()) -> object:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _slices_committed_by(conn: psycopg.Connection, run_id: UUID) -> int:
    return int(
        _scalar(  # type: ignore[arg-type]
            conn,
            f"select count(*) from {CONTROL}.slice_refreshes where run_id = %s and status = 'success'",
            (run_id,),
        )
    )


# --------------------------------------------------------------------------------------
# 9.1 The refresh lock lost mid-run
# --------------------------------------------------------------------------------------


def test_lockloss_mid_run_first_run_commits_nothing_more_and_fails(engine: Engine) -> None:
    e = engine
    e.create_source("events", CRASH_SCHEMA, CRASH_INSERT)
    name = "xt_lockloss_events"
    cfg = table_cfg(name, "events", cursor_column="Event Time", slice_size="day", lookback_days=3)
    first = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, cfg.model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert first.stdout is not None
        _ready, rid = first.stdout.readline().decode().split()
        run_a = UUID(rid)
        with e.pg() as watch:
            deadline = time.monotonic() + 60
            while _slices_committed_by(watch, run_a) < 2:
                assert first.poll() is None and time.monotonic() < deadline, "the first run ended early"
                time.sleep(0.01)
            # What a Postgres restart does to the lock, seen from the client: its session ends.
            killed = _scalar(
                watch,
                "select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = %s",
                (f"{runs.LOCK_SESSION_PREFIX}{run_a}",),
            )
            assert killed == 1
            # The barrier a taking-over run passes (mark_abandoned): a slice that checked the
            # lock before it was lost has committed now; from here on the first run commits nothing.
            with watch.transaction():
                watch.execute("select pg_advisory_xact_lock(%s)", (FENCE_LOCK_KEY,))
            at_loss = _slices_committed_by(watch, run_a)
            assert at_loss < 40, "the first run had finished"

            # A second run starts at once and refreshes the same table.
            second = e.refresh(cfg)
            out, _ = first.communicate(timeout=60)
            assert _slices_committed_by(watch, run_a) == at_loss, (
                "the first run committed after losing the lock"
            )
            status_line = out.decode().strip().splitlines()[-1]
            assert status_line.startswith("failed "), status_line
            assert f"run {run_a} lost the refresh lock" in status_line
            assert "Postgres restarted" in status_line and "run the refresh again" in status_line
            assert "\n" not in status_line
            err = _scalar(
                watch,
                f"select error from {CONTROL}.table_refreshes where run_id = %s and table_name = %s",
                (run_a, name),
            )
            assert "lost the refresh lock" in str(err)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.status == "success", second.error
    assert pg_checksums(e, name, "Event Id", CRASH_SCHEMA) == bq_checksums(
        e, "events", "Event Id", CRASH_SCHEMA
    )


def test_lockcheck_refuses_a_refresh_without_the_lock(engine: Engine) -> None:
    """A run that never held the lock (or whose lock is gone before it starts) writes nothing."""
    e = engine
    e.create_source("events", CRASH_SCHEMA, CRASH_INSERT)
    cfg = table_cfg("xt_lockcheck_events", "events", cursor_column="Event Time", slice_size="day")
    with locked_run(e.settings) as run_id:
        pass  # the run's lock is released here
    outcome = refresh_table(e.settings, e.clients, cfg, run_id, RefreshOptions())
    assert outcome.status == "failed" and not outcome.retryable
    assert outcome.error is not None and "lost the refresh lock" in outcome.error
    with e.pg() as conn:
        assert _scalar(conn, "select to_regclass('xt_lockcheck_raw.xt_lockcheck_events')") is None


# --------------------------------------------------------------------------------------
# 9.5 BigQuery stalls or dies in the middle of a read
# --------------------------------------------------------------------------------------

BIG_SCHEMA = [S("Id", "INT64"), S("Day", "DATE"), S("Payload", "STRING")]
# 4 days x 1,000 rows x ~1 KB: each slice's read is about 1 MB, many TCP segments.
BIG_INSERT = """
insert into {t} (`Id`, `Day`, `Payload`)
select n, date_add(date '2026-02-01', interval mod(n, 4) day), repeat(concat('p', cast(n as string)), 200)
from unnest(generate_array(0, 3999)) as n
"""

FAST = {"bq_timeout_s": 15.0, "bq_stall_timeout_s": 2.0, "table_retry_budget_s": 8.0}


def _proxied(e: Engine, proxy: FaultProxy, **kw: object):  # type: ignore[no-untyped-def]
    settings = get_settings(
        bq_storage_endpoint=f"127.0.0.1:{proxy.port}",
        bq_endpoint=e.settings.rest_endpoint,
        **FAST,
        **kw,
    )
    return settings, make_clients(settings)


def test_stall_mid_read_is_detected_within_the_stall_timeout(engine: Engine) -> None:
    e = engine
    e.create_source("big", BIG_SCHEMA, BIG_INSERT)
    assert e.settings.storage_endpoint is not None
    with FaultProxy(int(e.settings.storage_endpoint.rsplit(":", 1)[1])) as proxy:
        _, clients = _proxied(e, proxy)
        try:
            stats = ReadStats()
            proxy.stall_after(300_000)  # part of the first slice's read, then nothing
            with pytest.raises(TransientError) as info:
                for _ in read_storage(clients, "big", "", stats):
                    pass
            assert proxy.stalled_at is not None
            detected_after = time.monotonic() - proxy.stalled_at
            assert detected_after < FAST["bq_stall_timeout_s"] + 1.5, detected_after
            msg = str(info.value)
            assert f"127.0.0.1:{proxy.port}" in msg and "sqp-demo" in msg and "big" in msg
            assert "sent nothing for 2s" in msg
        finally:
            clients.close()


@pytest.mark.parametrize("fault", ["stall", "reset"])
def test_bqfault_mid_read_fails_the_table_within_budget_next_table_loads(engine: Engine, fault: str) -> None:
    e = engine
    e.create_source("big", BIG_SCHEMA, BIG_INSERT)
    e.create_source("small", BIG_SCHEMA, BIG_INSERT.replace("3999", "99"))
    hit = table_cfg(f"xt_bqfault_hit_{fault}", "big", cursor_column="Day", slice_size="day")
    other = table_cfg(f"xt_bqfault_other_{fault}", "small", cursor_column="Day", slice_size="day")
    assert e.settings.storage_endpoint is not None
    with FaultProxy(int(e.settings.storage_endpoint.rsplit(":", 1)[1])) as proxy:
        settings, clients = _proxied(e, proxy)
        try:
            with locked_run(settings) as run_id:
                # One slice (~1 MB) goes through, then the endpoint hangs or dies mid-slice.
                proxy.stall_after(1_600_000)
                if fault == "reset":
                    _reset_when_stalled(proxy)
                t0 = time.monotonic()
                failed = refresh_table(settings, clients, hit, run_id, RefreshOptions())
                took = time.monotonic() - t0
                proxy.resume()
                loaded = refresh_table(settings, clients, other, run_id, RefreshOptions())
            # The lock is free the moment the run ends: a second run starts at once.
            with runs.refresh_lock(settings):
                pass
        finally:
            clients.close()
    assert failed.status == "failed", failed.error
    assert 1 <= failed.slices_done < 4
    # budget + one attempt in flight (stall timeout or call deadline) + slack for a busy machine
    assert took < FAST["table_retry_budget_s"] + FAST["bq_timeout_s"] + 6, took
    err = failed.error or ""
    assert "\n" not in err
    assert f"127.0.0.1:{proxy.port}" in err and "sqp-demo" in err, err
    assert f"{hit.table_name} slice 2026-02-0" in err, err
    assert loaded.status == "success", loaded.error
    assert loaded.rows_inserted == 100


def _reset_when_stalled(proxy: FaultProxy) -> None:
    """Turn the stall into a dead endpoint: connections reset, new ones refused."""
    import threading

    def watch() -> None:
        while proxy.stalled_at is None:
            time.sleep(0.01)
        proxy.reset()

    threading.Thread(target=watch, daemon=True).start()


# --------------------------------------------------------------------------------------
# 8.3 A value Postgres cannot store
# --------------------------------------------------------------------------------------


def test_nul_in_a_string_fails_its_slice_only_naming_column_and_row(engine: Engine) -> None:
    e = engine
    e.create_source(
        "nul",
        BIG_SCHEMA,
        "insert into {t} (`Id`, `Day`, `Payload`) select n, date_add(date '2026-02-01', interval "
        "mod(n, 4) day), if(n = 42, concat('bad', code_points_to_string([0]), 'value'), 'ok') "
        "from unnest(generate_array(0, 99)) as n",
    )
    bad = e.bq(f"select `Payload` from {e.path('nul')} where `Id` = 42")[0]["Payload"]
    assert "\x00" in bad, "the emulator did not store the NUL character"
    name = "xt_nul_events"
    cfg = table_cfg(name, "nul", cursor_column="Day", slice_size="day")
    outcome = e.refresh(cfg)
    assert outcome.status == "failed" and not outcome.retryable
    err = outcome.error or ""
    assert "\n" not in err
    # day of n = 42 is 2026-02-03 (42 mod 4 = 2)
    assert f"{name}: slice 2026-02-03" in err and "column 'Payload'" in err, err
    assert "NUL" in err and "Id=42" in err and "Day=2026-02-03" in err, err
    assert "1 slice(s) not loaded" in err
    assert outcome.slices_done == 3
    with e.pg() as conn:
        per_day = dict(
            conn.execute("select day, count(*) from xt_nul_raw.xt_nul_events group by 1").fetchall()  # type: ignore[arg-type]
        )
        failed = conn.execute(
            f"select slice_start::date, error from {CONTROL}.slice_refreshes where table_name = %s "
            "and status = 'failed'",
            (name,),
        ).fetchall()
    assert sorted(str(d) for d in per_day) == ["2026-02-01", "2026-02-02", "2026-02-04"]
    assert all(n == 25 for n in per_day.values())
    assert len(failed) == 1 and str(failed[0][0]) == "2026-02-03" and "Id=42" in failed[0][1]


# --------------------------------------------------------------------------------------
# 9.2 Postgres goes away mid-run and comes back
# --------------------------------------------------------------------------------------


@pytest.fixture
def own_postgres() -> object:
    """A Postgres of this test only: stopping it leaves the session's stack alone."""
    d = Path(tempfile.mkdtemp(prefix="sqp-faults-pg-"))
    pg = EmbeddedPostgres(d / "pg", free_port())
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


def test_pgrestart_mid_run_cli_prints_one_line_and_the_run_ends_failed(
    engine: Engine, own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    e = engine
    e.create_source("events", CRASH_SCHEMA, CRASH_INSERT)
    registry = tmp_path / "tables.yml"
    registry.write_text(
        "tables:\n  xt_pgrestart_events:\n    source_table: events\n    cursor_column: Event Time\n"
        "    slice_size: day\n    lookback_days: 3\n"
    )
    env = {
        **os.environ,
        "REFRESH_PG_DSN": own_postgres.dsn,
        "REFRESH_TABLES_FILE": str(registry),
        "REFRESH_PG_RETRY_BUDGET_S": "60",
        "PGTZ": "UTC",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    }
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--no-stack",
            "--force",
            "--tables",
            "xt_pgrestart_events",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600  # a loaded machine takes minutes to start the run
        while True:
            assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()
            try:
                with psycopg.connect(own_postgres.dsn, autocommit=True) as c:
                    n = _scalar(c, f"select count(*) from {CONTROL}.checkpoints")
                    if int(n) >= 2:  # type: ignore[call-overload]
                        break
            except psycopg.Error:
                pass
            time.sleep(0.05)
        own_postgres.stop()
        time.sleep(3)
        own_postgres.start()
        out, err = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    print(err)  # shown with -rP: what a user sees
    assert cli.returncode == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "lost the refresh lock" in errors[0] and "xt_pgrestart_events" in errors[0], errors[0]
    with psycopg.connect(own_postgres.dsn, autocommit=True) as c:
        status, message = c.execute(f"select status, message from {CONTROL}.refresh_runs").fetchone()  # type: ignore[misc]
    assert status == "failed" and "lost the refresh lock" in message

    # The next run completes exactly (resuming after the committed slices); no run is left running.
    again = subprocess.run(cli.args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    with psycopg.connect(own_postgres.dsn, autocommit=True) as c:
        statuses = c.execute(f"select status from {CONTROL}.refresh_runs order by started_at").fetchall()
        skipped = c.execute(
            f"select slices_skipped from {CONTROL}.table_refreshes where status = 'success'"
        ).fetchone()
    assert statuses == [("failed",), ("success",)], statuses
    assert skipped is not None and skipped[0] >= 1, skipped
    own = Engine(get_settings(pg_dsn=own_postgres.dsn), e.clients)
    assert pg_checksums(own, "xt_pgrestart_events", "Event Id", CRASH_SCHEMA) == bq_checksums(
        e, "events", "Event Id", CRASH_SCHEMA
    )


def test_unreachable_bigquery_at_the_start_fails_within_the_call_deadline() -> None:
    """The flow calls check_reachable before it plans, takes the lock or writes a run row."""
    from flows.core.errors import SourceError
    from flows.engine.extract import check_reachable

    dead = free_port()  # nobody listens there
    settings = get_settings(bq_endpoint=f"http://127.0.0.1:{dead}", bq_timeout_s=3.0)
    clients = make_clients(settings)
    t0 = time.monotonic()
    try:
        with pytest.raises(SourceError) as info:
            check_reachable(clients)
    finally:
        clients.close()
    assert time.monotonic() - t0 < 3.0 + 5
    msg = str(info.value)
    assert f"cannot reach BigQuery at http://127.0.0.1:{dead} (project sqp-demo) within 3s" in msg
    assert "this run did nothing" in msg and "\n" not in msg


def test_lockstatus_a_running_run_whose_lock_is_gone_is_shown_as_such(engine: Engine) -> None:
    """`refresh status` / `refresh history` read flows.control.history.read_history: the truth while a run is stuck."""
    e = engine

    def shown(run_id: UUID) -> str:
        with e.pg() as c:
            rows = history.read_history(c, CONTROL, history.HistoryQuery(page_size=100)).rows
        return str(next(r for r in rows if r["run_id"] == run_id)["status"])

    with runs.refresh_lock(e.settings, wait_s=30) as conn:
        runs.mark_abandoned(conn, CONTROL)
        run = runs.start_run(conn, CONTROL, flow_run_id=None, trigger="test", params={})
        assert shown(run.run_id) == "running"
    # The process "went on" without its lock session (as after a Postgres restart).
    assert shown(run.run_id).startswith("running (lock lost")
    with e.pg() as c:
        assert runs.mark_abandoned(c, CONTROL) == 1


def test_lockholder_a_refused_refresh_names_the_one_still_starting(engine: Engine) -> None:
    """Before its run row exists (Prefect starting, planning) the lock holder is named by its
    trigger and process; once its run began, by the run id. A refused refresh says which."""
    e = engine

    def refused() -> str:
        with pytest.raises(runs.RefreshBusyError) as busy, runs.refresh_lock(e.settings, trigger="cli"):
            pass
        return str(busy.value)

    with runs.refresh_lock(e.settings, wait_s=30, trigger="schedule") as conn:
        runs.mark_abandoned(conn, CONTROL)
        msg = refused()
        assert (
            f"another refresh is running (a run starting, trigger schedule, no run id yet: pid {os.getpid()}"
            in msg
        )
        with e.pg() as c:
            holder = runs.lock_holder(c, CONTROL)
        assert holder is not None and (holder.run_id, holder.trigger, holder.pid) == (
            None,
            "schedule",
            os.getpid(),
        )
        run = runs.start_run(conn, CONTROL, flow_run_id=None, trigger="schedule", params={})
        assert f"another refresh is running (run {run.run_id}, schedule, started " in refused()
    with e.pg() as c:
        assert runs.lock_holder(c, CONTROL) is None
        assert runs.mark_abandoned(c, CONTROL) == 1


def test_firstbatch_is_read_before_the_slice_transaction_opens(engine: Engine) -> None:
    """A source slow to send its first batch must not keep a transaction (and its DELETE) open."""
    from uuid import uuid4

    import pyarrow as pa
    from psycopg.pq import TransactionStatus

    from flows.core.planning import Slice
    from flows.core.type_mapping import map_schema
    from flows.engine.load import apply_slice, ensure_raw_table

    e = engine
    columns = map_schema([("Id", "INT64", "NULLABLE", None, None)], "xt_firstbatch_t")
    with e.pg() as conn:
        with conn.transaction():
            ensure_raw_table(conn, e.raw, "xt_firstbatch_t", columns, None)
        conn.autocommit = False
        states: list[TransactionStatus] = []

        def batches():  # type: ignore[no-untyped-def]
            states.append(conn.info.transaction_status)
            yield pa.record_batch([pa.array([1, 2, 3], pa.int64())], names=["Id"])

        res = apply_slice(
            conn,
            schema=e.raw,
            table="xt_firstbatch_t",
            control_schema=CONTROL,
            columns=columns,
            cursor=None,
            piece=Slice(None, None),
            batches=batches(),
            run_id=uuid4(),
            checkpoint_key="xt_firstbatch_t",
        )
    assert res.rows_inserted == 3
    assert states == [TransactionStatus.IDLE], "the first batch was awaited inside the transaction"
