"""Delivering the outbox's events at-least-once: signed HTTP attempts, retries on the
spec's schedule, the dispatcher that drains what is due.

Every attempt of an event carries the same `webhook-id`. Plain functions: the flow, the
housekeeping flow and the CLI call them.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache, partial
from typing import Any

import httpx
import psycopg
from cryptography.fernet import InvalidToken

from flows.control import outbox
from flows.core.db import connect
from flows.core.errors import ConfigError
from flows.core.settings import Settings
from flows.notify.destinations import PinnedTransport, Resolver, system_resolver
from flows.notify.endpoint_checks import check_destination
from flows.notify.secrets import SecretBox, open_secrets
from flows.notify.signing import body, sign_headers
from flows.notify.webhook_events import links, shorten

log = logging.getLogger(__name__)

# Delays after the 1st, 2nd, ... failed attempt (the spec's schedule; the last one repeats).
RETRY_DELAYS_S = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600)
JITTER = 0.1
MAX_RESPONSE_CHARS = 1024


def retry_delay_s(failed_attempts: int, rng: Callable[[float, float], float] = random.uniform) -> float:
    base = RETRY_DELAYS_S[min(failed_attempts, len(RETRY_DELAYS_S)) - 1]
    return base * rng(1 - JITTER, 1 + JITTER)


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass
class AttemptResult:
    success: bool
    status_code: int | None = None
    latency_ms: float | None = None
    response_body: str | None = None
    error: str | None = None
    retry_after_s: float | None = None


def send(
    client: httpx.Client,
    transport: PinnedTransport,
    row: dict[str, Any],
    box: SecretBox,
    allow_private: bool,
    timeout_s: float,
    resolver: Resolver = system_resolver,
) -> AttemptResult:
    """One HTTP attempt to the address vetted now, all of it within `timeout_s` (a receiver
    that dribbles its answer is cut there); never raises. Only 2xx is success; redirects are
    not followed."""
    try:
        address = check_destination(row["url"], allow_private, resolver)
        keys = [box.decrypt(row["secret_enc"])]
        if row["previous_secret_enc"]:
            keys.append(box.decrypt(row["previous_secret_enc"]))
    except ConfigError as exc:
        return AttemptResult(False, error=str(exc))
    except InvalidToken:
        return AttemptResult(
            False,
            error="cannot decrypt the endpoint's secret: the encryption key changed "
            "(REFRESH_SECRET_KEY or the key file); run `refresh webhooks rotate-secret`",
        )
    payload = body(row["event"], row["event_created_at"], row["payload"])
    headers = sign_headers(row["event_id"], payload, keys, datetime.now(UTC))
    started = time.monotonic()
    try:
        with (
            transport.attempt(row["url"], address, timeout_s),
            client.stream(
                "POST", row["url"], content=payload.encode(), headers=headers, timeout=timeout_s
            ) as resp,
        ):
            got = b""
            for chunk in resp.iter_bytes():
                got += chunk
                if len(got) >= MAX_RESPONSE_CHARS:
                    break
        code = resp.status_code
        return AttemptResult(
            success=200 <= code < 300,
            status_code=code,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            response_body=got[:MAX_RESPONSE_CHARS].decode("utf-8", "replace"),
            error=None if 200 <= code < 300 else f"HTTP {code}",
            retry_after_s=retry_after_s(resp.headers.get("retry-after"), datetime.now(UTC)),
        )
    except httpx.HTTPError as exc:
        # The exception text names the failure (refused, timed out), never the headers.
        return AttemptResult(
            False,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            error=shorten(f"{type(exc).__name__}: {exc} (address {address}, {timeout_s:g} s per attempt)"),
        )


@dataclass
class DispatchResult:
    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    exhausted: int = 0
    disabled: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _settle(
    conn: psycopg.Connection,
    settings: Settings,
    row: dict[str, Any],
    res: AttemptResult,
    now: datetime,
    result: DispatchResult,
    disabled: set[int],
) -> None:
    schema = settings.control_schema
    attempt = row["attempts"] + 1
    outbox.record_attempt(
        conn,
        schema,
        row["id"],
        attempt=attempt,
        success=res.success,
        status_code=res.status_code,
        latency_ms=res.latency_ms,
        response_body=res.response_body,
        error=res.error,
    )
    result.attempted += 1
    common = {"attempts": attempt, "status_code": res.status_code, "error": res.error}
    if res.success:
        result.succeeded += 1
        outbox.update_delivery(
            conn, schema, row["id"], status=outbox.DeliveryStatus.SUCCEEDED, next_attempt_at=None, **common
        )
        return
    result.failed += 1
    if res.status_code == 410 and row["endpoint_id"] not in disabled:
        result.disabled += 1
        disabled.add(row["endpoint_id"])
        outbox.disable_endpoint(
            conn, schema, row["endpoint_id"], f"receiver answered 410 Gone on {now:%Y-%m-%d %H:%M} UTC"
        )
    if row["endpoint_id"] in disabled:  # also the batch's other deliveries to it
        outbox.update_delivery(
            conn, schema, row["id"], status=outbox.DeliveryStatus.CANCELLED, next_attempt_at=None, **common
        )
        return
    delay = retry_delay_s(attempt)
    if res.retry_after_s is not None:
        delay = max(delay, res.retry_after_s)
    nxt = now + timedelta(seconds=delay)
    if nxt <= row["retry_from"] + timedelta(hours=settings.webhook_horizon_hours):
        outbox.update_delivery(
            conn, schema, row["id"], status=outbox.DeliveryStatus.PENDING, next_attempt_at=nxt, **common
        )
        return
    result.exhausted += 1
    outbox.update_delivery(
        conn, schema, row["id"], status=outbox.DeliveryStatus.EXHAUSTED, next_attempt_at=None, **common
    )
    if row["event"] not in ("delivery.exhausted", "webhook.test"):
        outbox.emit(
            conn,
            schema,
            "delivery.exhausted",
            {
                "delivery_id": row["id"],
                "endpoint_id": row["endpoint_id"],
                "event_id": row["event_id"],
                "event_type": row["event"],
                "run_id": str(row["run_id"]) if row["run_id"] else None,
                "table": row["table_name"],
                "attempts": attempt,
                "first_attempt_at": row["retry_from"].isoformat(),
                "last_status_code": res.status_code,
                "last_error": res.error,
                "links": links(None, settings),
            },
            table_name=row["table_name"],
            run_id=row["run_id"],
        )


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")


def dispatch(
    settings: Settings,
    *,
    deadline_s: float,
    wait: bool = False,
    clock: Callable[[], datetime] | None = None,
    delivery_ids: list[int] | None = None,
    batch_size: int = 32,
    resolver: Resolver = system_resolver,
) -> DispatchResult:
    """Deliver what is due, for at most `deadline_s` seconds (each attempt's timeout is cut to
    what is left). With `wait`, also wait for retries that fall due before the deadline.

    Due deliveries are locked `for update skip locked` while they are sent and recorded, so two
    dispatchers never send the same attempt; a crash before the commit leaves them pending and
    they are sent again, with the same webhook-id (at-least-once).
    """
    clock = clock or (lambda: datetime.now(UTC))
    schema = settings.control_schema
    start = time.monotonic()
    result = DispatchResult()
    disabled: set[int] = set()
    box: SecretBox | None = None  # only when there is something to sign: no key file otherwise
    # No Nagle: headers and body go out as two writes, and the second would wait for an ACK.
    transport = PinnedTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    client = httpx.Client(transport=transport, follow_redirects=False, trust_env=False)
    with connect(settings) as conn, client:
        while True:
            left = deadline_s - (time.monotonic() - start)
            if left <= 0.01:
                break
            with conn.transaction():
                rows = outbox.claim_due(conn, schema, clock(), batch_size, delivery_ids)
                if rows:
                    box = box or open_secrets(settings, conn)
                    timeout = min(settings.webhook_timeout_s, left)
                    one = partial(
                        send,
                        client,
                        transport,
                        box=box,
                        resolver=resolver,
                        allow_private=settings.webhook_allow_private,
                        timeout_s=timeout,
                    )
                    results = list(_pool().map(one, rows))
                    for row, res in zip(rows, results, strict=True):
                        _settle(conn, settings, row, res, clock(), result, disabled)
                    continue
            if not wait:
                break
            nxt = outbox.next_due(conn, schema)
            conn.commit()
            if nxt is None or (nxt - clock()).total_seconds() > left:
                break
            time.sleep(max(0.05, (nxt - clock()).total_seconds()))
    return result


def dispatch_after_run(settings: Settings) -> DispatchResult | None:
    """One short pass after a run; never raises and never takes long: what is left over goes
    out from the hourly housekeeping flow."""
    try:
        return dispatch(settings, deadline_s=settings.webhook_run_deadline_s)
    except Exception as exc:
        log.warning("webhook dispatch after the run failed; the events stay in the outbox: %s", exc)
        return None
