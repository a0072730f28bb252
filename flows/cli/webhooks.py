"""`refresh webhooks ...`: endpoints, secrets, test and replay, delivery history."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from flows.cli.common import PG_HINT, fail, load_settings, new_grid, one_line_errors, out, plain, ts
from flows.control import outbox
from flows.core.errors import ConfigError
from flows.core.settings import Settings

webhooks_app = typer.Typer(
    help="Webhooks (Standard Webhooks): endpoints, secrets, test, replay, deliveries.",
    no_args_is_help=True,
)


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _ready() -> Settings:
    """Settings, with the control schema migrated (the webhook tables exist)."""
    from flows.core.db import migrate

    settings = load_settings()
    with one_line_errors(PG_HINT):
        migrate(settings)
    return settings


def parse_since(value: str) -> datetime:
    """A date (YYYY-MM-DD, midnight UTC) or an ISO timestamp (UTC unless it says otherwise)."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(
            f"--since {value!r} is not a date or timestamp (e.g. 2026-11-28 or 2026-11-28T02:00)"
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@webhooks_app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="http(s) URL the events are POSTed to")],
    events: Annotated[
        list[str] | None,
        typer.Option(
            "--event", "-e", help="Event type to subscribe (repeat or comma-separated); default: all"
        ),
    ] = None,
    description: Annotated[str, typer.Option("--description", "-d")] = "",
) -> None:
    """Register an endpoint; prints its signing secret ONCE (store it in the receiver)."""
    from flows.notify import endpoints

    settings = _ready()
    with one_line_errors("see `refresh webhooks add --help`"):
        new = endpoints.add_endpoint(settings, url, events, description, who=_who())
    out.print(f"endpoint {new.id} added")
    out.print(f"signing secret (shown once, keep it in the receiver): {new.secret}")


@webhooks_app.command("list")
def list_() -> None:
    """Endpoints (never their secrets)."""
    settings = _ready()
    from flows.core.db import connect

    with one_line_errors(PG_HINT), connect(settings) as conn:
        rows = outbox.list_endpoints(conn, settings.control_schema)
    grid = new_grid("id", "url", "events", "enabled", "description", "rotation grace until", "updated")
    for r in rows:
        grid.add_row(
            str(r["id"]),
            plain(r["url"]),
            ", ".join(r["event_types"]),
            "yes" if r["enabled"] else f"no ({plain(r['disabled_reason'] or 'disabled')})",
            plain(r["description"]),
            ts(r["previous_secret_expires_at"]),
            f"{ts(r['updated_at'])} by {plain(r['updated_by'])}",
        )
    out.print(grid if rows else "no webhook endpoint (add one with `refresh webhooks add URL`)")


@webhooks_app.command("update")
def update(
    endpoint_id: Annotated[int, typer.Argument(help="Endpoint id (see `list`)")],
    url: Annotated[str | None, typer.Option(help="New http(s) URL")] = None,
    events: Annotated[
        list[str] | None,
        typer.Option("--event", "-e", help="Replace the subscribed event types (repeat or comma-separated)"),
    ] = None,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Disabling cancels its pending deliveries")
    ] = None,
) -> None:
    """Change an endpoint's URL, events, description or enabled state (the secret stays)."""
    from flows.notify import endpoints

    settings = _ready()
    with one_line_errors("see `refresh webhooks update --help`"):
        endpoints.update_endpoint(
            settings,
            endpoint_id,
            url=url,
            description=description,
            event_types=events,
            enabled=enabled,
            who=_who(),
        )
    out.print(f"endpoint {endpoint_id} updated")


@webhooks_app.command("remove")
def remove(endpoint_id: Annotated[int, typer.Argument(help="Endpoint id (see `list`)")]) -> None:
    """Remove an endpoint: nothing more is sent to it; its delivery history stays."""
    settings = _ready()
    from flows.core.db import connect

    with one_line_errors(PG_HINT), connect(settings) as conn, conn.transaction():
        outbox.remove_endpoint(conn, settings.control_schema, endpoint_id, _who())
    out.print(f"endpoint {endpoint_id} removed")


@webhooks_app.command("rotate-secret")
def rotate_secret(
    endpoint_id: Annotated[int, typer.Argument(help="Endpoint id (see `list`)")],
    grace_hours: Annotated[
        float | None,
        typer.Option(
            help="Hours the old secret still signs (default REFRESH_WEBHOOK_ROTATION_GRACE_HOURS, 24)"
        ),
    ] = None,
) -> None:
    """New signing secret, printed ONCE; both are sent (two signatures) for the grace period."""
    from flows.notify import endpoints

    settings = _ready()
    with one_line_errors(PG_HINT):
        secret = endpoints.rotate_secret(settings, endpoint_id, grace_hours, who=_who())
    out.print(f"endpoint {endpoint_id}: new signing secret (shown once): {secret}")


def _print_attempts(settings: Settings, delivery_id: int) -> None:
    from flows.core.db import connect

    with connect(settings) as conn:
        rows = outbox.attempts_of(conn, settings.control_schema, [delivery_id])[delivery_id]
    grid = new_grid("attempt", "at", "ok", "status", "ms", "error", "response")
    for a in rows:
        grid.add_row(
            str(a["attempt"]),
            ts(a["attempted_at"]),
            "yes" if a["success"] else "no",
            str(a["status_code"] or "-"),
            str(a["latency_ms"] or "-"),
            plain(a["error"] or ""),
            plain((a["response_body"] or "")[:80]),
        )
    out.print(grid)


@webhooks_app.command("test")
def test(endpoint_id: Annotated[int, typer.Argument(help="Endpoint id (see `list`)")]) -> None:
    """Send a signed `webhook.test` event to one endpoint now and show the answer."""
    from flows.notify import endpoints

    settings = _ready()
    with one_line_errors(PG_HINT):
        sent = endpoints.send_test(settings, endpoint_id, who=_who())
        _print_attempts(settings, sent.delivery_id)
    if not sent.result.succeeded:
        fail(f"test delivery {sent.delivery_id} failed", "see the error above; the receiver must answer 2xx")


@webhooks_app.command("replay")
def replay(
    since: Annotated[str, typer.Option(help="Re-send events created since (date or ISO timestamp, UTC)")],
    endpoint_id: Annotated[int | None, typer.Option("--endpoint", help="Only to this endpoint")] = None,
    deadline_s: Annotated[
        float, typer.Option(help="Seconds to spend sending now; the rest stays queued")
    ] = 60,
) -> None:
    """Queue the events since a time again (same webhook-id, so receivers deduplicate) and send."""
    from flows.core.db import connect
    from flows.notify import webhook_delivery

    settings = _ready()
    with one_line_errors(PG_HINT):
        when = parse_since(since)
        with connect(settings) as conn, conn.transaction():
            if endpoint_id is not None:
                outbox.get_endpoint(conn, settings.control_schema, endpoint_id)
            queued = outbox.queue_replay(conn, settings.control_schema, when, endpoint_id)
        result = webhook_delivery.dispatch(settings, deadline_s=deadline_s, delivery_ids=queued)
    out.print(
        f"{len(queued)} deliveries queued since {when:%Y-%m-%d %H:%M} UTC; sent now: {result.to_dict()}"
    )


@webhooks_app.command("deliveries")
def deliveries(
    endpoint_id: Annotated[int | None, typer.Option("--endpoint")] = None,
    status: Annotated[str | None, typer.Option(help="pending | succeeded | exhausted | cancelled")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    delivery_id: Annotated[
        int | None, typer.Option("--id", help="Show every attempt of one delivery")
    ] = None,
) -> None:
    """Recent deliveries (newest first), or every attempt of one with --id."""
    settings = _ready()
    from flows.core.db import connect

    if status is not None and status not in set(outbox.DeliveryStatus):
        fail(f"unknown status {status!r}", f"use one of {', '.join(outbox.DeliveryStatus)}")
    with one_line_errors(PG_HINT):
        if delivery_id is not None:
            _print_attempts(settings, delivery_id)
            return
        with connect(settings) as conn:
            rows = outbox.list_deliveries(
                conn,
                settings.control_schema,
                endpoint_id=endpoint_id,
                status=None if status is None else outbox.DeliveryStatus(status),
                limit=limit,
            )
    grid = new_grid(
        "id", "endpoint", "event", "webhook-id", "status", "attempts", "last", "next", "last error"
    )
    for r in rows:
        grid.add_row(*_delivery_cells(r))
    out.print(grid if rows else "no delivery")


def _delivery_cells(r: dict[str, Any]) -> list[str]:
    return [
        str(r["id"]),
        str(r["endpoint_id"]),
        r["event"],
        r["event_id"],
        r["status"],
        str(r["attempts"]),
        f"{ts(r['last_attempt_at'])} {r['last_status_code'] or ''}".strip(),
        ts(r["next_attempt_at"]) if r["status"] == outbox.DeliveryStatus.PENDING else "-",
        plain(r["last_error"] or ""),
    ]


@webhooks_app.command("dispatch")
def dispatch(
    deadline_s: Annotated[float, typer.Option(help="Seconds to keep sending and waiting for retries")] = 60,
) -> None:
    """Deliver what is due now (housekeeping does this hourly); waits for retries due before the deadline."""
    from flows.notify import webhook_delivery

    settings = _ready()
    with one_line_errors(PG_HINT):
        result = webhook_delivery.dispatch(settings, deadline_s=deadline_s, wait=True)
    out.print(result.to_dict())
