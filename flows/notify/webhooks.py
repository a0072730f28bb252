"""Webhooks per the Standard Webhooks specification: events, signing and delivery.

Events are written to the outbox (the control schema's `events` table) in the transaction of
the audit row that causes them (flows.control.outbox.emit); `dispatch` delivers them
at-least-once with the same `webhook-id` on every attempt. Plain functions: the flow, the
housekeeping flow and the CLI call them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import psycopg
from cryptography.fernet import InvalidToken
from standardwebhooks.webhooks import Webhook

from flows.control import outbox
from flows.control.runs import RunStatus
from flows.control.tables import TableStatus
from flows.core.db import connect
from flows.core.errors import ConfigError, SchemaDriftError
from flows.core.settings import Settings
from flows.notify.destinations import DestinationRefused, PinnedTransport, Resolver, system_resolver, vet
from flows.notify.secrets import SecretBox, open_secrets

if TYPE_CHECKING:
    from flows.control.tables import TableOutcome
    from flows.orchestration.runbook import RunSummary

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "refresh.completed",
    "refresh.warning",
    "refresh.failed",
    "table.failed",
    "table.registered",
    "schema.drift",
    "validation.failed",
    "table.cutover",
    "table.rollback",
    "delivery.exhausted",
)
RUN_EVENTS = {
    RunStatus.SUCCESS: "refresh.completed",
    RunStatus.WARNING: "refresh.warning",
    RunStatus.FAILED: "refresh.failed",
}
# Delays after the 1st, 2nd, ... failed attempt (the spec's schedule; the last one repeats).
RETRY_DELAYS_S = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600)
JITTER = 0.1
MAX_ERROR_CHARS = 500
MAX_RESPONSE_CHARS = 1024
MAX_URL_CHARS = 2000
MAX_DESCRIPTION_CHARS = 500
SECRET_BYTES = 32
USER_AGENT = "sqp-refresh-webhooks/1"


# --- secrets -------------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


# --- validation ----------------------------------------------------------------------------


class WebhookInputError(ConfigError):
    """Bad input for an endpoint; `field` names it (the API reports it per field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_event_types(values: list[str] | None) -> list[str]:
    names = [v.strip() for raw in values or [] for v in raw.split(",") if v.strip()]
    if not names:
        return list(EVENT_TYPES)
    unknown = [n for n in names if n not in EVENT_TYPES]
    if unknown:
        raise WebhookInputError(
            "event_types", f"unknown event type(s) {', '.join(unknown)}: use {', '.join(EVENT_TYPES)}"
        )
    return list(dict.fromkeys(names))


def validate_description(text: str) -> str:
    if "\x00" in text:
        raise WebhookInputError("description", "description must not contain a NUL character (\\x00)")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise WebhookInputError(
            "description", f"description is longer than {MAX_DESCRIPTION_CHARS} characters"
        )
    return text


def validate_grace_hours(grace: float) -> float:
    if not 0 <= grace <= 24 * 30:
        raise WebhookInputError("grace_hours", f"grace period must be between 0 and 720 hours, got {grace}")
    return grace


def check_destination(url: str, allow_private: bool, resolver: Resolver = system_resolver) -> str:
    """The vetted address to deliver `url` to (flows.notify.destinations has the rules)."""
    try:
        return vet(url, allow_private, resolver)
    except DestinationRefused as exc:
        raise WebhookInputError("url", str(exc)) from None


def validate_url(url: str, allow_private: bool) -> str:
    url = url.strip()
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise WebhookInputError(
            "url", "webhook URL must not contain spaces or control characters: encode them"
        )
    try:
        parts = urlsplit(url)
        _port = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise WebhookInputError("url", f"webhook URL is malformed ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise WebhookInputError(
            "url", f"webhook URL must start with http:// or https://, got {parts.scheme or 'none'!r}"
        )
    if not parts.hostname:
        raise WebhookInputError("url", "webhook URL has no host")
    if parts.username or parts.password:
        raise WebhookInputError(
            "url", "webhook URL must not carry credentials (user:password@): the signature authenticates"
        )
    if len(url) > MAX_URL_CHARS:
        raise WebhookInputError("url", f"webhook URL is longer than {MAX_URL_CHARS} characters")
    check_destination(url, allow_private)
    return url


# --- endpoints -----------------------------------------------------------------------------


@dataclass
class NewEndpoint:
    id: int
    secret: str  # shown once, never stored in clear


def add_endpoint(
    settings: Settings,
    url: str,
    event_types: list[str] | None,
    description: str = "",
    who: str = "cli",
) -> NewEndpoint:
    # The cheap checks first: the URL's resolves the host.
    types = validate_event_types(event_types)
    validate_description(description)
    url = validate_url(url, settings.webhook_allow_private)
    secret = new_secret()
    with connect(settings) as conn, conn.transaction():
        eid = outbox.create_endpoint(
            conn,
            settings.control_schema,
            url=url,
            description=description,
            event_types=types,
            secret_enc=open_secrets(settings, conn).encrypt(secret),
            who=who,
        )
    return NewEndpoint(eid, secret)


def rotate_secret(
    settings: Settings,
    endpoint_id: int,
    grace_hours: float | None = None,
    who: str = "cli",
) -> str:
    """A new secret (returned, shown once); the old one signs too for the grace period."""
    default = settings.webhook_rotation_grace_hours
    grace = validate_grace_hours(default if grace_hours is None else grace_hours)
    secret = new_secret()
    with connect(settings) as conn, conn.transaction():
        outbox.rotate_secret(
            conn,
            settings.control_schema,
            endpoint_id,
            new_secret_enc=open_secrets(settings, conn).encrypt(secret),
            grace_hours=grace,
            who=who,
        )
    return secret


def update_endpoint(
    settings: Settings,
    endpoint_id: int,
    *,
    url: str | None = None,
    description: str | None = None,
    event_types: list[str] | None = None,
    enabled: bool | None = None,
    who: str = "cli",
) -> dict[str, Any]:
    """Change the given fields (None = keep), validated as `add` validates them; the endpoint
    as it is now (never its secret)."""
    if url is not None:
        url = validate_url(url, settings.webhook_allow_private)
    if event_types is not None:
        if not [v for raw in event_types for v in raw.split(",") if v.strip()]:
            raise WebhookInputError("event_types", "subscribe to at least one event type")
        event_types = validate_event_types(event_types)
    if description is not None:
        validate_description(description)
    with connect(settings) as conn, conn.transaction():
        return outbox.update_endpoint(
            conn,
            settings.control_schema,
            endpoint_id,
            who=who,
            url=url,
            description=description,
            event_types=event_types,
            enabled=enabled,
        )


@dataclass
class SentTestEvent:
    delivery_id: int
    result: DispatchResult


def send_test(settings: Settings, endpoint_id: int, who: str = "cli") -> SentTestEvent:
    """Queue a signed `webhook.test` event for one endpoint and send it now (one attempt,
    waiting at most the attempt timeout); the attempt is recorded like any other."""
    with connect(settings) as conn, conn.transaction():
        endpoint = outbox.get_endpoint(conn, settings.control_schema, endpoint_id)
        if not endpoint["enabled"]:
            raise ConfigError(
                f"webhook endpoint {endpoint_id} is disabled ({endpoint['disabled_reason'] or 'disabled'}): "
                "enable it first"
            )
        delivery = outbox.queue_test(
            conn, settings.control_schema, endpoint_id, {"message": "test event", "by": who}
        )
    result = dispatch(settings, deadline_s=settings.webhook_timeout_s + 5, delivery_ids=[delivery])
    return SentTestEvent(delivery, result)


# --- events --------------------------------------------------------------------------------


def _short(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 20] + f"... ({len(text)} chars)"


def links(flow_run_id: str | None, settings: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    if settings.dashboard_url:
        out["dashboard"] = settings.dashboard_url
    ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    if ui and flow_run_id:
        out["prefect_flow_run"] = f"{ui}/runs/flow-run/{flow_run_id}"
    return out


def run_finished(conn: psycopg.Connection, settings: Settings, summary: RunSummary) -> str | None:
    """The run's refresh.completed / .warning / .failed event (call in the run row's transaction).

    A dry run writes nothing but its run row, and tells nobody: no event.
    """
    if summary.dry_run:
        return None
    data = {
        "run_id": summary.run_id,
        "flow_run_id": summary.flow_run_id,
        "status": summary.status,
        "message": _short(summary.message, 2000),
        "duration_s": summary.duration_s,
        "tables": [
            {
                "table": t["table"],
                "status": t["status"],
                "mode": t["mode"],
                "rows_read": t["rows_read"],
                "rows_inserted": t["rows_inserted"],
                "rows_deleted": t["rows_deleted"],
                "slices": t["slices"],
                "window": t["window"],
                "error": _short(t["error"]),
            }
            for t in summary.tables
        ],
        "dbt": {
            "invocation_id": summary.dbt_invocation_id,
            "models_built": summary.dbt_models_built,
            "failed": summary.dbt_failed[:20],
        },
        "links": links(summary.flow_run_id, settings),
    }
    return outbox.emit(conn, settings.control_schema, RUN_EVENTS[summary.status], data, run_id=summary.run_id)


def runs_abandoned(conn: psycopg.Connection, settings: Settings) -> int:
    """refresh.failed for each run this transaction marked abandoned (a killed process)."""
    rows = outbox.abandoned_now(conn, settings.control_schema)
    for r in rows:
        flow_run_id = str(r["flow_run_id"]) if r["flow_run_id"] else None
        data = {
            "run_id": str(r["run_id"]),
            "flow_run_id": flow_run_id,
            "status": RunStatus.ABANDONED,
            "message": _short(r["message"], 2000),
            "started_at": r["started_at"].isoformat(),
            "links": links(flow_run_id, settings),
        }
        outbox.emit(conn, settings.control_schema, "refresh.failed", data, run_id=r["run_id"])
    return len(rows)


def table_finished(
    conn: psycopg.Connection, settings: Settings, rec: TableOutcome, failure: BaseException | None
) -> None:
    """table.failed (and schema.drift when drift stopped it); call in the audit row's transaction."""
    if rec.status != TableStatus.FAILED:
        return
    data = {
        "run_id": str(rec.run_id),
        "table": rec.table_name,
        "mode": rec.mode,
        "error": _short(rec.error),
        "slices_done": rec.slices_done,
        "rows_inserted": rec.rows_inserted,
        "links": links(None, settings),
    }
    schema = settings.control_schema
    outbox.emit(conn, schema, "table.failed", data, table_name=rec.table_name, run_id=rec.run_id)
    if isinstance(failure, SchemaDriftError):
        outbox.emit(conn, schema, "schema.drift", data, table_name=rec.table_name, run_id=rec.run_id)


# --- signing and delivery ------------------------------------------------------------------


def body(event_type: str, created_at: datetime, data: dict[str, Any]) -> str:
    """The JSON body; the same bytes on every attempt of an event."""
    stamp = created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": stamp, "data": data}, separators=(",", ":"))


def sign_headers(event_id: str, payload: str, secrets_: list[str], at: datetime) -> dict[str, str]:
    """Standard Webhooks headers; one `v1,` signature per secret (two during a rotation)."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(s).sign(event_id, at, payload) for s in secrets_),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


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
            error=_short(f"{type(exc).__name__}: {exc} (address {address}, {timeout_s:g} s per attempt)"),
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
