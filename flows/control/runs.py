"""Runs (`refresh_runs`) and the refresh lock that lets one run at a time write.

A run holds a session-level advisory lock for its whole life, on a connection named after it,
so any session can tell whether a `running` row still has a live process behind it (the fence
of check_lock, mark_abandoned, and the `lock lost` note of the run history).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from flows.core.db import FENCE_LOCK_KEY, REFRESH_LOCK_KEY, connect, qualified
from flows.core.errors import LockLostError, TerminalError
from flows.core.settings import Settings


class RunStatus(StrEnum):
    """`refresh_runs.status`."""

    RUNNING = "running"
    SUCCESS = "success"
    WARNING = "warning"
    FAILED = "failed"
    ABANDONED = "abandoned"


class RefreshBusyError(TerminalError):
    """Another refresh holds the lock."""


@contextlib.contextmanager
def refresh_lock(
    settings: Settings, wait_s: float = 0.0, *, trigger: str = "manual"
) -> Iterator[psycopg.Connection]:
    """Hold the refresh advisory lock on a dedicated connection for the whole run.

    With wait_s > 0 a second run waits that long for the first one; otherwise it fails at once.
    The lock dies with the session, so a killed process never leaves it behind. Until the run
    is bound to it (bind_lock), the session is named after `trigger` and this process
    (lock_holder), so a refused trigger learns what is starting.
    """
    conn = connect(settings, autocommit=True)
    held = False
    try:
        conn.execute(
            "select set_config('application_name', %s, false)",
            (f"{LOCK_STARTING_PREFIX}pid {os.getpid()} {trigger}",),
        )
        if wait_s > 0:
            conn.execute("select set_config('lock_timeout', %s, false)", (f"{int(wait_s * 1000)}ms",))
            try:
                conn.execute("select pg_advisory_lock(%s)", (REFRESH_LOCK_KEY,))
            except psycopg.errors.LockNotAvailable as exc:
                raise RefreshBusyError(f"another refresh still held the lock after {wait_s:.0f}s") from exc
        else:
            got = conn.execute("select pg_try_advisory_lock(%s)", (REFRESH_LOCK_KEY,)).fetchone()
            if not got or not got[0]:
                raise RefreshBusyError(
                    f"another refresh is running{_describe_running(conn, settings.control_schema)}: "
                    "this run did nothing; start it again when that one ends (see `refresh status`)"
                )
        held = True
        yield conn
    finally:
        if held and not conn.broken:
            # Released before close returns: the server ends a closed session asynchronously,
            # and a run started right after this one must not find the lock still held.
            with contextlib.suppress(psycopg.Error):
                conn.execute("select pg_advisory_unlock(%s)", (REFRESH_LOCK_KEY,))
        conn.close()


def _describe_running(conn: psycopg.Connection, schema: str) -> str:
    try:
        holder = lock_holder(conn, schema)
    except psycopg.Error:
        return ""
    return "" if holder is None else f" ({holder.describe()})"


@dataclass(frozen=True)
class LockHolder:
    """Who holds the refresh lock: a run (run_id set), or a process still starting its run
    (Prefect's start, planning: its trigger and pid), or an unknown session (pid None)."""

    since: datetime  # the run's start, else when the lock session connected
    run_id: UUID | None = None
    flow_run_id: UUID | None = None
    trigger: str | None = None
    pid: int | None = None
    client: str | None = None  # the holder's address as Postgres sees it (None: a local socket)
    backend_pid: int | None = None

    def describe(self) -> str:
        at = f"{self.since:%Y-%m-%d %H:%M:%S %Z}"
        if self.run_id is not None:
            trigger = f", {self.trigger}" if self.trigger else ""
            flow_run = f", flow run {self.flow_run_id}" if self.flow_run_id else ""
            return f"run {self.run_id}{trigger}, started {at}{flow_run}"
        where = f" on {self.client}" if self.client else ""
        if self.pid is not None:
            starting = f"a run starting, trigger {self.trigger}, no run id yet"
            return f"{starting}: pid {self.pid}{where}, lock taken {at}"
        return f"the refresh lock is held by Postgres session {self.backend_pid}{where} since {at}"

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "flow_run_id": self.flow_run_id,
            "trigger": self.trigger,
            "pid": self.pid,
            "started_at": self.since,
        }


def lock_holder(conn: psycopg.Connection, schema: str) -> LockHolder | None:
    """The holder of the refresh lock other than this session, or None when nobody holds it.

    Read from the lock session's name: bound to a run (LOCK_SESSION_PREFIX + run id), or
    still starting (LOCK_STARTING_PREFIX + pid and trigger, set by refresh_lock)."""
    row = conn.execute(
        sql.SQL(
            "select a.application_name, a.backend_start, host(a.client_addr), a.pid, "
            "r.run_id, r.trigger, r.started_at, r.flow_run_id "
            "from pg_locks l join pg_stat_activity a on a.pid = l.pid "
            "left join {r} r on a.application_name = {prefix} || r.run_id::text "
            "where {lock} and l.pid <> pg_backend_pid()"
        ).format(
            r=qualified(schema, "refresh_runs"),
            prefix=sql.Literal(LOCK_SESSION_PREFIX),
            lock=_refresh_lock_row(),
        )
    ).fetchone()
    if row is None:
        return None
    name, connected, client, backend_pid, run_id, trigger, started_at, flow_run_id = row
    if run_id is None and (name or "").startswith(LOCK_SESSION_PREFIX):
        # bound a moment before its row is written (start_run)
        with contextlib.suppress(ValueError):
            run_id = UUID(name.removeprefix(LOCK_SESSION_PREFIX))
    if run_id is not None:
        return LockHolder(
            started_at or connected, run_id, flow_run_id, trigger, client=client, backend_pid=backend_pid
        )
    starting = re.fullmatch(rf"{re.escape(LOCK_STARTING_PREFIX)}pid (\d+) (.*)", name or "", re.DOTALL)
    if starting:
        return LockHolder(
            connected, trigger=starting[2], pid=int(starting[1]), client=client, backend_pid=backend_pid
        )
    return LockHolder(connected, client=client, backend_pid=backend_pid)


def _refresh_lock_row() -> sql.Composable:
    # Advisory locks on a bigint key show up in pg_locks as classid = high 32 bits,
    # objid = low 32 bits, objsubid = 1, scoped to the current database.
    return sql.SQL(
        "l.locktype = 'advisory' and l.granted "
        "and l.database = (select oid from pg_database where datname = current_database()) "
        "and l.classid = {hi} and l.objid = {lo} and l.objsubid = 1"
    ).format(hi=sql.Literal(REFRESH_LOCK_KEY >> 32), lo=sql.Literal(REFRESH_LOCK_KEY & 0xFFFFFFFF))


def _lock_held_elsewhere() -> sql.Composable:
    return sql.SQL("exists (select 1 from pg_locks l where {} and l.pid <> pg_backend_pid())").format(
        _refresh_lock_row()
    )


# The lock session of a run is named after it, so any session can tell whether the refresh lock
# is still held for that run: after a Postgres restart or failover it is held by nobody, or by
# a later run's session, never again by this run's.
LOCK_SESSION_PREFIX = "sqp-refresh lock "
# The lock session before its run is bound (Prefect starting, planning): pid and trigger.
LOCK_STARTING_PREFIX = "sqp-refresh starting "


def lock_held_for(run_id: sql.Composable) -> sql.Composable:
    return sql.SQL(
        "exists (select 1 from pg_locks l join pg_stat_activity a on a.pid = l.pid "
        "where {row} and a.application_name = {prefix} || ({run_id})::text)"
    ).format(row=_refresh_lock_row(), prefix=sql.Literal(LOCK_SESSION_PREFIX), run_id=run_id)


def bind_lock(lock_conn: psycopg.Connection, run_id: UUID) -> None:
    """Name the lock session after the run: check_lock then recognises it."""
    lock_conn.execute("select set_config('application_name', %s, false)", (f"{LOCK_SESSION_PREFIX}{run_id}",))


def check_lock(conn: psycopg.Connection, run_id: UUID, doing: str) -> None:
    """The fence: raise LockLostError unless run_id's lock session still holds the refresh lock.

    Inside a slice transaction, call it last before the commit. It takes FENCE_LOCK_KEY shared
    until that commit, and a run taking over takes it exclusively (mark_abandoned) after it got
    the refresh lock: so a slice that passed the check has committed before the new run goes
    on, and any later check of the old run fails. No slice commits once its run lost the lock.
    """
    if not conn.autocommit:
        conn.execute("select pg_advisory_xact_lock_shared(%s)", (FENCE_LOCK_KEY,))
    row = conn.execute(sql.SQL("select {}").format(lock_held_for(sql.Literal(str(run_id))))).fetchone()
    if not (row and row[0]):
        raise LockLostError(
            f"run {run_id} lost the refresh lock (Postgres restarted, failed over, or ended its "
            f"lock session), so another refresh may run now: stopped {doing} and wrote nothing "
            "more; run the refresh again: slices committed before are kept and it resumes after them"
        )


def refresh_running(conn: psycopg.Connection) -> bool:
    """True while another session holds the refresh lock (a refresh is in progress)."""
    row = conn.execute(sql.SQL("select {}").format(_lock_held_elsewhere())).fetchone()
    return bool(row and row[0])


def mark_abandoned(conn: psycopg.Connection, schema: str) -> int:
    """Runs left `running` by a process that died become `abandoned`; returns how many.

    A run is `running` only while its process holds the refresh lock, and the lock dies with
    the process's session. So when no other session holds the lock, every `running` row is
    left over from a dead process. The check and the update are one statement: a run that
    takes the lock meanwhile inserts its row after this statement's snapshot and is not
    touched. Safe to call from the lock holder (begin_run) and from housekeeping, which
    never takes the lock and so never makes a starting refresh fail as busy.
    """
    # The barrier of check_lock: a slice of a run that lost the lock and passed its check just
    # before commits before this; any later check fails, so no abandoned run commits again.
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (FENCE_LOCK_KEY,))
    cur = conn.execute(
        sql.SQL(
            "update {r} set status = 'abandoned', finished_at = now(), "
            "message = coalesce(message || '; ', '') || 'process ended without finishing (pid ' || "
            "coalesce(pid::text, '?') || ' on ' || coalesce(hostname, '?') || ')' "
            "where status = 'running' and not {held}"
        ).format(r=qualified(schema, "refresh_runs"), held=_lock_held_elsewhere())
    )
    conn.execute(
        sql.SQL(
            "update {t} set status = 'failed', finished_at = now(), "
            "error = coalesce(error, 'run abandoned') where status = 'running' "
            "and run_id in (select run_id from {r} where status = 'abandoned')"
        ).format(t=qualified(schema, "table_refreshes"), r=qualified(schema, "refresh_runs"))
    )
    return cur.rowcount


@dataclass
class RunRecord:
    run_id: UUID
    started_at: datetime


@dataclass
class RunSummary:
    """What a run did, as its Prefect artifact, its `refresh.*` event and the CLI show it."""

    run_id: str
    status: RunStatus
    message: str
    tables: list[dict[str, Any]] = field(default_factory=list)
    dbt_models_built: int = 0
    dbt_nodes: int = 0
    dbt_failed: list[str] = field(default_factory=list)
    # Nodes dbt skipped because something upstream of them failed: stale in Postgres.
    dbt_skipped: list[str] = field(default_factory=list)
    first_error: str | None = None
    dbt_invocation_id: str | None = None
    dry_run: bool = False
    flow_run_id: str | None = None
    duration_s: float = 0.0
    # The after-refresh validation of each live table (flows.engine.validation.AfterRefresh.to_dict).
    validation: list[dict[str, Any]] = field(default_factory=list)
    # The shadow build and its comparison with live (None: no shadow table loaded).
    shadow: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_run(
    conn: psycopg.Connection, schema: str, *, flow_run_id: UUID | None, trigger: str, params: dict[str, Any]
) -> RunRecord:
    """Insert the run's row; `conn` is the lock connection, which is bound to the run (fence)."""
    run_id = uuid4()
    bind_lock(conn, run_id)
    row = conn.execute(
        sql.SQL(
            "insert into {r} (run_id, flow_run_id, status, trigger, params, pid, hostname) "
            "values (%s, %s, 'running', %s, %s, %s, %s) returning started_at"
        ).format(r=qualified(schema, "refresh_runs")),
        (run_id, flow_run_id, trigger, json.dumps(params, default=str), os.getpid(), socket.gethostname()),
    ).fetchone()
    assert row is not None
    return RunRecord(run_id, row[0])


def heartbeat(conn: psycopg.Connection, schema: str, run_id: UUID) -> None:
    conn.execute(
        sql.SQL("update {r} set heartbeat_at = now() where run_id = %s").format(
            r=qualified(schema, "refresh_runs")
        ),
        (run_id,),
    )


def finish_run(
    conn: psycopg.Connection,
    schema: str,
    run_id: UUID,
    *,
    status: RunStatus,
    message: str,
    tables_planned: int,
    tables_succeeded: int,
    tables_failed: int,
    rows_read: int,
    rows_inserted: int,
    dbt_invocation_id: str | None,
) -> None:
    conn.execute(
        sql.SQL(
            "update {r} set status = %s, finished_at = now(), heartbeat_at = now(), message = %s, "
            "tables_planned = %s, tables_succeeded = %s, tables_failed = %s, rows_read = %s, "
            "rows_inserted = %s, dbt_invocation_id = %s where run_id = %s"
        ).format(r=qualified(schema, "refresh_runs")),
        (
            status,
            message,
            tables_planned,
            tables_succeeded,
            tables_failed,
            rows_read,
            rows_inserted,
            dbt_invocation_id,
            run_id,
        ),
    )


def set_plan(conn: psycopg.Connection, schema: str, run_id: UUID, plan: list[dict[str, Any]]) -> None:
    """A dry run keeps what it would have done (per table, per slice) on its run row."""
    conn.execute(
        sql.SQL("update {} set plan = %s where run_id = %s").format(qualified(schema, "refresh_runs")),
        (json.dumps(plan, default=str), run_id),
    )


def prune(conn: psycopg.Connection, schema: str, retention_days: int) -> dict[str, int]:
    """Delete runs (with their table, slice, dbt and data-quality rows) and events older than
    `retention_days`, in one transaction; returns rows deleted per table.

    Running runs are never deleted, nor the latest run of any table, so `refresh status` and
    the freshness views still know when every table was last refreshed.
    """

    def t(name: str) -> sql.Composable:
        return qualified(schema, name)

    deleted: dict[str, int] = {}
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "create temp table old_runs on commit drop as select run_id from {r} "
                "where status <> 'running' and coalesce(finished_at, started_at) "
                "  < now() - make_interval(days => %s) "
                "and run_id not in (select distinct on (table_name) run_id from {tr} "
                "  order by table_name, started_at desc)"
            ).format(r=t("refresh_runs"), tr=t("table_refreshes")),
            (retention_days,),
        )
        steps: list[tuple[str, sql.Composed]] = [
            (
                "dbt_node_runs",
                sql.SQL(
                    "delete from {n} where invocation_id in (select invocation_id from {i} "
                    "where run_id in (select run_id from old_runs))"
                ).format(n=t("dbt_node_runs"), i=t("dbt_invocations")),
            ),
            *(
                (
                    name,
                    sql.SQL("delete from {} where run_id in (select run_id from old_runs)").format(t(name)),
                )
                for name in (
                    "dbt_invocations",
                    "dq_results",
                    "slice_refreshes",
                    "table_refreshes",
                    "refresh_runs",
                )
            ),
        ]
        for name, stmt in steps:
            deleted[name] = conn.execute(stmt).rowcount
        deleted["events"] = conn.execute(
            sql.SQL("delete from {} where created_at < now() - make_interval(days => %s)").format(
                t("events")
            ),
            (retention_days,),
        ).rowcount
    return deleted
