"""Control-schema access for webhooks: the events outbox, endpoints, deliveries and attempts.

Plain SQL on a caller's connection; the caller owns the transaction. Secrets arrive and leave
encrypted: this module never sees a plaintext secret.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from flows.core.db import qualified
from flows.core.errors import ConfigError

MAX_DATA_BYTES = 19_000  # the whole body ({type, timestamp, data}) stays under 20 KB


class DeliveryStatus(StrEnum):
    """`webhook_deliveries.status`."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    EXHAUSTED = "exhausted"
    CANCELLED = "cancelled"


class EndpointNotFound(ConfigError):
    """No (or a removed) endpoint with that id."""


def fit(data: dict[str, Any]) -> dict[str, Any]:
    """Keep the body under 20 KB: drop entries from the end of `tables`, then of the longest
    other list, saying how many (`<list>_omitted`); cut strings of more than 2,000 characters."""
    for key, value in data.items():
        if isinstance(value, str) and len(value) > 2000:
            data[key] = value[:1980] + f"... ({len(value)} chars)"
    while len(json.dumps(data, default=str).encode()) > MAX_DATA_BYTES:
        lists = [k for k, v in data.items() if isinstance(v, list) and v]
        if not lists:
            break
        size = {k: len(json.dumps(data[k], default=str)) for k in lists}
        key = "tables" if "tables" in lists else max(lists, key=size.__getitem__)
        data[key].pop()
        data[f"{key}_omitted"] = data.get(f"{key}_omitted", 0) + 1
    return data


def emit(
    conn: psycopg.Connection,
    schema: str,
    event_type: str,
    data: dict[str, Any],
    *,
    table_name: str | None = None,
    run_id: Any = None,
) -> str:
    """Write one event to the outbox and queue a delivery per subscribed endpoint; its event id.

    One statement, so it is atomic even on an autocommit connection; inside the caller's
    transaction it commits (or not) with the audit row that caused it. Every event goes through
    here (runs, tables, registration, validation, rollout, exhaustion), so `fit` bounds them all.
    """
    data = fit(data)
    row = conn.execute(
        sql.SQL(
            "with e as (insert into {ev} (event, table_name, run_id, payload) values (%s, %s, %s, %s) "
            "  returning id, event_id), "
            "d as (insert into {d} (event_id, endpoint_id) select e.id, w.id from e, {w} w "
            "  where w.enabled and w.removed_at is null and %s = any(w.event_types)) "
            "select event_id from e"
        ).format(
            ev=qualified(schema, "events"),
            d=qualified(schema, "webhook_deliveries"),
            w=qualified(schema, "webhook_endpoints"),
        ),
        (event_type, table_name, run_id, json.dumps(data, default=str), event_type),
    ).fetchone()
    assert row is not None
    return str(row[0])


def abandoned_now(conn: psycopg.Connection, schema: str) -> list[dict[str, Any]]:
    """Runs marked abandoned by this transaction (their finished_at is its start time)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "select run_id, flow_run_id, message, started_at from {r} "
                "where status = 'abandoned' and finished_at = now()"
            ).format(r=qualified(schema, "refresh_runs"))
        )
        return cur.fetchall()


ENDPOINT_COLUMNS = sql.SQL(
    "id, url, description, event_types, enabled, disabled_reason, "
    "previous_secret_expires_at, created_at, created_by, updated_at, updated_by"
)


def create_endpoint(
    conn: psycopg.Connection,
    schema: str,
    *,
    url: str,
    description: str,
    event_types: list[str],
    secret_enc: str,
    who: str,
) -> int:
    row = conn.execute(
        sql.SQL(
            "insert into {w} (url, description, event_types, secret_enc, created_by, updated_by) "
            "values (%s, %s, %s, %s, %s, %s) returning id"
        ).format(w=qualified(schema, "webhook_endpoints")),
        (url, description, event_types, secret_enc, who, who),
    ).fetchone()
    assert row is not None
    return int(row[0])


def list_endpoints(conn: psycopg.Connection, schema: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("select {c} from {w} where removed_at is null order by id").format(
                c=ENDPOINT_COLUMNS, w=qualified(schema, "webhook_endpoints")
            )
        )
        return cur.fetchall()


def get_endpoint(conn: psycopg.Connection, schema: str, endpoint_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("select {c} from {w} where id = %s and removed_at is null").format(
                c=ENDPOINT_COLUMNS, w=qualified(schema, "webhook_endpoints")
            ),
            (endpoint_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id}: `refresh webhooks list` shows the ids")
    return row


def update_endpoint(
    conn: psycopg.Connection,
    schema: str,
    endpoint_id: int,
    *,
    who: str,
    url: str | None = None,
    description: str | None = None,
    event_types: list[str] | None = None,
    enabled: bool | None = None,
) -> dict[str, Any]:
    """Change the given fields (None = keep). Disabling cancels the pending deliveries;
    enabling clears the reason it was disabled (e.g. a 410)."""
    get_endpoint(conn, schema, endpoint_id)
    reason = None if enabled is not False else f"disabled by {who}"
    conn.execute(
        sql.SQL(
            "update {w} set url = coalesce(%s, url), description = coalesce(%s, description), "
            "event_types = coalesce(%s, event_types), enabled = coalesce(%s, enabled), "
            "disabled_reason = case when %s::boolean is null then disabled_reason else %s end, "
            "updated_at = now(), updated_by = %s where id = %s"
        ).format(w=qualified(schema, "webhook_endpoints")),
        (url, description, event_types, enabled, enabled, reason, who, endpoint_id),
    )
    if enabled is False:
        _cancel_pending(conn, schema, endpoint_id, reason or "disabled")
    return get_endpoint(conn, schema, endpoint_id)


def _cancel_pending(conn: psycopg.Connection, schema: str, endpoint_id: int, why: str) -> None:
    conn.execute(
        sql.SQL(
            "update {d} set status = 'cancelled', last_error = %s "
            "where endpoint_id = %s and status = 'pending'"
        ).format(d=qualified(schema, "webhook_deliveries")),
        (why, endpoint_id),
    )


def remove_endpoint(conn: psycopg.Connection, schema: str, endpoint_id: int, who: str) -> None:
    """Soft delete: the endpoint's delivery history stays; pending deliveries are cancelled."""
    get_endpoint(conn, schema, endpoint_id)
    conn.execute(
        sql.SQL(
            "update {w} set removed_at = now(), enabled = false, updated_at = now(), updated_by = %s "
            "where id = %s"
        ).format(w=qualified(schema, "webhook_endpoints")),
        (who, endpoint_id),
    )
    _cancel_pending(conn, schema, endpoint_id, "endpoint removed")


def disable_endpoint(conn: psycopg.Connection, schema: str, endpoint_id: int, reason: str) -> None:
    conn.execute(
        sql.SQL(
            "update {w} set enabled = false, disabled_reason = %s, updated_at = now(), "
            "updated_by = 'dispatcher' where id = %s"
        ).format(w=qualified(schema, "webhook_endpoints")),
        (reason, endpoint_id),
    )
    _cancel_pending(conn, schema, endpoint_id, reason)


def rotate_secret(
    conn: psycopg.Connection,
    schema: str,
    endpoint_id: int,
    *,
    new_secret_enc: str,
    grace_hours: float,
    who: str,
) -> None:
    """The current secret becomes the previous one, still signed with for `grace_hours`."""
    get_endpoint(conn, schema, endpoint_id)
    conn.execute(
        sql.SQL(
            "update {w} set previous_secret_enc = secret_enc, secret_enc = %s, "
            "previous_secret_expires_at = now() + make_interval(secs => %s), "
            "updated_at = now(), updated_by = %s where id = %s"
        ).format(w=qualified(schema, "webhook_endpoints")),
        (new_secret_enc, grace_hours * 3600, who, endpoint_id),
    )


SECRET_COLUMNS = ("secret_enc", "previous_secret_enc")


def stored_secrets(conn: psycopg.Connection, schema: str) -> list[tuple[int, str, str]]:
    """(endpoint id, column, encrypted value) of every secret a live endpoint keeps."""
    rows = conn.execute(
        sql.SQL(
            "select id, secret_enc, previous_secret_enc from {w} where removed_at is null order by id"
        ).format(w=qualified(schema, "webhook_endpoints"))
    ).fetchall()
    return [
        (r[0], col, value) for r in rows for col, value in zip(SECRET_COLUMNS, r[1:], strict=True) if value
    ]


def replace_stored_secret(
    conn: psycopg.Connection, schema: str, endpoint_id: int, column: str, old: str, new: str
) -> None:
    """Re-encrypted: the same secret under another key. Only while the column still holds `old`,
    so a rotation that ran meanwhile is kept."""
    if column not in SECRET_COLUMNS:
        raise ValueError(f"not a secret column: {column}")
    conn.execute(
        sql.SQL("update {w} set {c} = %s where id = %s and {c} = %s").format(
            w=qualified(schema, "webhook_endpoints"), c=sql.Identifier(column)
        ),
        (new, endpoint_id, old),
    )


def claim_due(
    conn: psycopg.Connection,
    schema: str,
    now: datetime,
    limit: int,
    delivery_ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Lock up to `limit` due deliveries (skipping those another dispatcher holds), with what
    sending them needs. The locks last until the caller's transaction ends."""
    only = sql.SQL(" and d.id = any(%s)") if delivery_ids is not None else sql.SQL("")
    params: list[Any] = [now, *([delivery_ids] if delivery_ids is not None else []), limit]
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "select d.id, d.attempts, d.retry_from, d.endpoint_id, e.id as event_pk, e.event_id, "
                "e.event, e.payload, e.run_id, e.table_name, e.created_at as event_created_at, "
                "w.url, w.secret_enc, "
                "case when w.previous_secret_expires_at > %s then w.previous_secret_enc end "
                "  as previous_secret_enc "
                "from {d} d join {e} e on e.id = d.event_id join {w} w on w.id = d.endpoint_id "
                "where d.status = 'pending' and d.next_attempt_at <= %s and w.enabled{only} "
                "order by d.next_attempt_at, d.id limit %s for update of d skip locked"
            ).format(
                d=qualified(schema, "webhook_deliveries"),
                e=qualified(schema, "events"),
                w=qualified(schema, "webhook_endpoints"),
                only=only,
            ),
            [now, *params],
        )
        return cur.fetchall()


def record_attempt(
    conn: psycopg.Connection,
    schema: str,
    delivery_id: int,
    *,
    attempt: int,
    success: bool,
    status_code: int | None,
    latency_ms: float | None,
    response_body: str | None,
    error: str | None,
) -> None:
    conn.execute(
        sql.SQL(
            "insert into {a} (delivery_id, attempt, success, status_code, latency_ms, response_body, error) "
            "values (%s, %s, %s, %s, %s, %s, %s)"
        ).format(a=qualified(schema, "webhook_attempts")),
        (delivery_id, attempt, success, status_code, latency_ms, response_body, error),
    )


def update_delivery(
    conn: psycopg.Connection,
    schema: str,
    delivery_id: int,
    *,
    status: DeliveryStatus,
    attempts: int,
    next_attempt_at: datetime | None,
    status_code: int | None,
    error: str | None,
) -> None:
    conn.execute(
        sql.SQL(
            "update {d} set status = %s, attempts = %s, next_attempt_at = coalesce(%s, next_attempt_at), "
            "last_attempt_at = now(), last_status_code = %s, last_error = %s where id = %s"
        ).format(d=qualified(schema, "webhook_deliveries")),
        (status, attempts, next_attempt_at, status_code, error, delivery_id),
    )


def next_due(conn: psycopg.Connection, schema: str) -> datetime | None:
    row = conn.execute(
        sql.SQL(
            "select min(d.next_attempt_at) from {d} d join {w} w on w.id = d.endpoint_id "
            "where d.status = 'pending' and w.enabled"
        ).format(d=qualified(schema, "webhook_deliveries"), w=qualified(schema, "webhook_endpoints"))
    ).fetchone()
    return row[0] if row else None


def queue_replay(
    conn: psycopg.Connection, schema: str, since: datetime, endpoint_id: int | None = None
) -> list[int]:
    """Deliver again every event since `since` to each enabled endpoint subscribed to it
    (or only `endpoint_id`): same event ids, a fresh retry horizon. The delivery ids."""
    only = sql.SQL(" and w.id = %s") if endpoint_id is not None else sql.SQL("")
    rows = conn.execute(
        sql.SQL(
            "insert into {d} (event_id, endpoint_id) select e.id, w.id from {e} e join {w} w "
            "on e.event = any(w.event_types) where e.created_at >= %s and w.enabled "
            "and w.removed_at is null{only} "
            "on conflict (event_id, endpoint_id) do update set status = 'pending', attempts = 0, "
            "retry_from = now(), next_attempt_at = now(), last_error = null returning id"
        ).format(
            d=qualified(schema, "webhook_deliveries"),
            e=qualified(schema, "events"),
            w=qualified(schema, "webhook_endpoints"),
            only=only,
        ),
        [since, *([endpoint_id] if endpoint_id is not None else [])],
    ).fetchall()
    return [int(r[0]) for r in rows]


def queue_test(conn: psycopg.Connection, schema: str, endpoint_id: int, data: dict[str, Any]) -> int:
    """A `webhook.test` event delivered to this endpoint only (whatever it subscribes to)."""
    get_endpoint(conn, schema, endpoint_id)
    row = conn.execute(
        sql.SQL(
            "with e as (insert into {e} (event, payload) values ('webhook.test', %s) returning id) "
            "insert into {d} (event_id, endpoint_id) select e.id, %s from e returning id"
        ).format(e=qualified(schema, "events"), d=qualified(schema, "webhook_deliveries")),
        (json.dumps(data), endpoint_id),
    ).fetchone()
    assert row is not None
    return int(row[0])


def list_deliveries(
    conn: psycopg.Connection,
    schema: str,
    *,
    endpoint_id: int | None = None,
    status: DeliveryStatus | None = None,
    limit: int = 20,
    offset: int = 0,
    delivery_id: int | None = None,
    with_attempts: bool = False,
) -> list[dict[str, Any]]:
    """Deliveries, newest first; `with_attempts`: each with its attempts in order as `attempt_log`."""
    cond, params = _delivery_filter(endpoint_id, status, delivery_id)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "select d.id, d.endpoint_id, e.event_id, e.event, d.status, d.attempts, d.created_at, "
                "d.last_attempt_at, d.next_attempt_at, d.last_status_code, d.last_error "
                "from {d} d join {e} e on e.id = d.event_id{cond} order by d.id desc limit %s offset %s"
            ).format(d=qualified(schema, "webhook_deliveries"), e=qualified(schema, "events"), cond=cond),
            [*params, limit, offset],
        )
        rows = cur.fetchall()
    if not with_attempts:
        return rows
    tries = attempts_of(conn, schema, [r["id"] for r in rows])
    return [{**r, "attempt_log": tries[r["id"]]} for r in rows]


def count_deliveries(
    conn: psycopg.Connection,
    schema: str,
    *,
    endpoint_id: int | None = None,
    status: DeliveryStatus | None = None,
) -> int:
    cond, params = _delivery_filter(endpoint_id, status)
    row = conn.execute(
        sql.SQL("select count(*) from {d} d{cond}").format(
            d=qualified(schema, "webhook_deliveries"), cond=cond
        ),
        params,
    ).fetchone()
    return int(row[0]) if row else 0


def _delivery_filter(
    endpoint_id: int | None, status: DeliveryStatus | None, delivery_id: int | None = None
) -> tuple[sql.Composable, list[Any]]:
    where: list[sql.Composable] = []
    params: list[Any] = []
    if delivery_id is not None:
        where.append(sql.SQL("d.id = %s"))
        params.append(delivery_id)
    if endpoint_id is not None:
        where.append(sql.SQL("d.endpoint_id = %s"))
        params.append(endpoint_id)
    if status is not None:
        where.append(sql.SQL("d.status = %s"))
        params.append(status)
    cond = sql.SQL(" where ") + sql.SQL(" and ").join(where) if where else sql.SQL("")
    return cond, params


def attempts_of(
    conn: psycopg.Connection, schema: str, delivery_ids: list[int]
) -> dict[int, list[dict[str, Any]]]:
    """Every attempt of each delivery, in order (one query for a page of deliveries)."""
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in delivery_ids}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "select delivery_id, attempt, attempted_at, success, status_code, latency_ms, "
                "response_body, error from {a} where delivery_id = any(%s) order by delivery_id, attempt, id"
            ).format(a=qualified(schema, "webhook_attempts")),
            (delivery_ids,),
        )
        for row in cur.fetchall():
            out[row.pop("delivery_id")].append(row)
    return out
