"""The checks of a webhook endpoint's fields (URL and destination, event types, description,
rotation grace), each failure naming its field."""

from __future__ import annotations

from urllib.parse import urlsplit

from flows.core.errors import ConfigError
from flows.notify.destinations import DestinationRefused, Resolver, system_resolver, vet
from flows.notify.webhook_events import EVENT_TYPES

MAX_URL_CHARS = 2000
MAX_DESCRIPTION_CHARS = 500


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
