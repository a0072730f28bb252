"""Refreshes started through the API: one row per accepted trigger, keyed by the token and
its Idempotency-Key, so a retried request finds the run it already started (and no other
token's). Pruned with the audit (flows.orchestration.housekeeping)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from flows.core.db import REFRESH_LOCK_KEY, qualified

# Serialises trigger requests (check, start, record) across API workers; next to the
# refresh lock's key (flows/core/db.py).
TRIGGER_LOCK_KEY = REFRESH_LOCK_KEY + 1000


@dataclass(frozen=True)
class Trigger:
    trigger_id: UUID
    idempotency_key: str | None
    request_sha256: str
    params: dict[str, Any]
    via: str
    flow_run_id: UUID | None
    pid: int | None
    hostname: str | None
    created_at: datetime
    run_id: UUID | None = None
    run_status: str | None = None
    refused: str | None = None


def lock(conn: psycopg.Connection) -> None:
    """Held until the caller's transaction ends."""
    conn.execute("select pg_advisory_xact_lock(%s)", (TRIGGER_LOCK_KEY,))


_SELECT = sql.SQL(
    "select a.trigger_id, a.idempotency_key, a.request_sha256, a.params, a.via, a.flow_run_id, a.pid, "
    "a.hostname, a.created_at, r.run_id, r.status as run_status, a.refused from {a} a "
    # The run a trigger started: the Prefect flow run's, or the one the started process began
    # (the audit row records the process id and host).
    "left join lateral (select run_id, status from {r} r where "
    "  (a.flow_run_id is not null and r.flow_run_id = a.flow_run_id) or "
    "  (a.via = 'process' and r.pid = a.pid and r.hostname = a.hostname and r.started_at >= a.created_at) "
    "  order by r.started_at limit 1) r on true "
)


def _one(conn: psycopg.Connection, schema: str, where: sql.Composable, *values: Any) -> Trigger | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _SELECT.format(a=qualified(schema, "api_triggers"), r=qualified(schema, "refresh_runs")) + where,
            values,
        )
        row = cur.fetchone()
    return None if row is None else Trigger(**row)


def by_key(conn: psycopg.Connection, schema: str, token_id: str, key: str) -> Trigger | None:
    """The trigger this token sent with this Idempotency-Key."""
    return _one(conn, schema, sql.SQL("where a.token_id = %s and a.idempotency_key = %s"), token_id, key)


def key_used(conn: psycopg.Connection, schema: str, key: str) -> bool:
    """Whether any token has sent this Idempotency-Key."""
    row = conn.execute(
        sql.SQL("select exists (select 1 from {a} where idempotency_key = %s)").format(
            a=qualified(schema, "api_triggers")
        ),
        (key,),
    ).fetchone()
    return bool(row and row[0])


def get(conn: psycopg.Connection, schema: str, trigger_id: UUID) -> Trigger | None:
    return _one(conn, schema, sql.SQL("where a.trigger_id = %s"), trigger_id)


def prune(conn: psycopg.Connection, schema: str, retention_days: int) -> int:
    """Delete triggers older than `retention_days`; returns how many."""
    return conn.execute(
        sql.SQL("delete from {a} where created_at < now() - make_interval(days => %s)").format(
            a=qualified(schema, "api_triggers")
        ),
        (retention_days,),
    ).rowcount


def record(
    conn: psycopg.Connection,
    schema: str,
    *,
    trigger_id: UUID,
    idempotency_key: str | None,
    request_sha256: str,
    params: dict[str, Any],
    via: str,
    flow_run_id: UUID | None,
    pid: int | None,
    hostname: str | None,
    token_id: str | None,
) -> None:
    conn.execute(
        sql.SQL(
            "insert into {a} (trigger_id, idempotency_key, request_sha256, params, via, flow_run_id, pid, "
            "hostname, token_id) values (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(a=qualified(schema, "api_triggers")),
        (
            trigger_id,
            idempotency_key,
            request_sha256,
            json.dumps(params, default=str),
            via,
            flow_run_id,
            pid,
            hostname,
            token_id,
        ),
    )


def refuse_process(conn: psycopg.Connection, schema: str, pid: int, hostname: str, reason: str) -> int:
    """The trigger whose process (pid on hostname) was refused before its run began: records
    why. Returns how many triggers it matched (0 when the process was not started by the API)."""
    cur = conn.execute(
        sql.SQL(
            "update {a} set refused = %s where trigger_id = (select trigger_id from {a} where via = "
            "'process' and pid = %s and hostname = %s and refused is null order by created_at desc limit 1)"
        ).format(a=qualified(schema, "api_triggers")),
        (reason, pid, hostname),
    )
    return cur.rowcount
