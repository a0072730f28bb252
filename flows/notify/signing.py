"""Standard Webhooks signing: endpoint secrets, the body every attempt sends, its signed headers."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

SECRET_BYTES = 32
USER_AGENT = "sqp-refresh-webhooks/1"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


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
