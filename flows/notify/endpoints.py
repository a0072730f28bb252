"""Managing webhook endpoints: add, update, rotate a secret (shown once, stored encrypted),
send a test event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flows.control import outbox
from flows.core.db import connect
from flows.core.errors import ConfigError
from flows.core.settings import Settings
from flows.notify.endpoint_checks import (
    WebhookInputError,
    validate_description,
    validate_event_types,
    validate_grace_hours,
    validate_url,
)
from flows.notify.secrets import open_secrets
from flows.notify.signing import new_secret
from flows.notify.webhook_delivery import DispatchResult, dispatch


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
