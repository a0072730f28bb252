"""Secrets never leave the process in text: every message, log record and audit error goes
through `redact`.

Two layers: the secret values of the settings in use are registered and masked wherever they
appear verbatim (also percent-decoded), and patterns mask what looks like a secret even when
its value is unknown (a DSN's password, including malformed DSNs, `password=...`, private
keys, webhook secrets, bearer tokens).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Anything between `scheme://user:` and the last `@` of the authority, even when the rest of
# the DSN does not parse (a bad percent-escape, a stray character).
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)(?P<secret>[^\s'\"]*)(?=@)")
_KV_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|sslpassword|secret|token|api_key|apikey)\s*[=:]\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s,;'\")]+)",
    re.IGNORECASE,
)
_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL
)
_JSON_PRIVATE_KEY = re.compile(
    r"(?P<head>[\"']private_key(?:_id)?[\"']\s*:\s*)(?P<secret>\"(?:[^\"\\]|\\.)*\"?)"
)
_WEBHOOK_SECRET = re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_MIN_SECRET_LEN = 4  # masking shorter strings would garble ordinary words


def register_secret(value: str | None) -> None:
    """Mask `value` (and its percent-decoded form) wherever it appears from now on."""
    global _secrets
    if not value:
        return
    candidates = {value, unquote(value), value.strip()}
    with _lock:
        known = set(_secrets)
        known.update(c for c in candidates if len(c) >= _MIN_SECRET_LEN)
        _secrets = tuple(sorted(known, key=len, reverse=True))


def dsn_password(dsn: str) -> str | None:
    """The password in a URI or key=value DSN, found without parsing it (it may be malformed)."""
    m = _URI_PASSWORD.search(dsn)
    if m:
        return m.group("secret") or None
    m = _KV_PASSWORD.search(dsn)
    if m:
        return m.group("secret").strip("'\"") or None
    return None


def register_dsn(dsn: str | None) -> None:
    if dsn:
        register_secret(dsn_password(dsn))


def redact(text: object) -> str:
    """`text` with every known secret and everything that looks like one masked."""
    s = str(text)
    for secret in _secrets:
        if secret in s:
            s = s.replace(secret, MASK)
    s = _PRIVATE_KEY.sub(MASK, s)
    s = _JSON_PRIVATE_KEY.sub(lambda m: f'{m.group("head")}"{MASK}"', s)
    s = _URI_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}", s)
    s = _KV_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}", s)
    s = _WEBHOOK_SECRET.sub(f"whsec_{MASK}", s)
    return _BEARER.sub(lambda m: f"{m.group('head')}{MASK}", s)


def error_text(exc: BaseException) -> str:
    """An exception as the one-line-ish text stored in audit rows and shown to people."""
    return redact(str(exc) or type(exc).__name__)


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, arguments and traceback text before any handler
    (console, file, Prefect's API) formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_formatter = logging.Formatter()


def _redact_record(record: logging.LogRecord) -> None:
    if getattr(record, "_redacted", False):
        return
    try:
        message = record.getMessage()
    except Exception:  # a bad format string is the caller's bug: keep the raw text
        message = str(record.msg)
        record.msg, record.args = redact(message), None
    else:
        clean = redact(message)
        if clean != message:
            _mask_record(record, clean)
        # else: msg and args stay as they came: formatters that read the arguments
        # (uvicorn's access log unpacks them) keep working
    if record.exc_info and not record.exc_text:
        record.exc_text = _formatter.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    record._redacted = True


def _mask_record(record: logging.LogRecord, clean: str) -> None:
    """Mask a secret in the message or its arguments: argument by argument when that masks
    it (so the record keeps its shape), else the whole message, formatted, with no arguments."""
    args = record.args
    if isinstance(record.msg, str) and isinstance(args, tuple):
        masked = tuple(redact(a) if isinstance(a, str) else a for a in args)
        try:
            message = redact(record.msg) % masked if masked else redact(record.msg)
        except (TypeError, ValueError):
            message = None
        if message is not None and redact(message) == message:
            record.msg, record.args = redact(record.msg), masked
            return
    record.msg, record.args = clean, None


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process at creation, whichever logger or handler
    (Prefect configures its own later), plus a filter on the loggers that carry DSNs."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    flt = RedactingFilter()
    for name in ("", "prefect", "psycopg", "alembic", "sqlalchemy", "flows"):
        logging.getLogger(name).addFilter(flt)
