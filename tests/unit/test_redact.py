"""Masking of secrets in text and log records (flows.core.redact)."""

from __future__ import annotations

import logging
import sys

import pytest

from flows.core import redact as r


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://u:hunter2pw@db:5432/x", "hunter2pw"),
        ("postgresql://u:hun%ZZter2pw@db:5432/x", "hun%ZZter2pw"),  # malformed escape
        ("postgresql://u:p@ss@word@db/x", "p@ss@word"),
        ("host=db user=u password=hunter2pw dbname=x", "hunter2pw"),
        ("host=db password = 'a b hunter2' dbname=x", "a b hunter2"),
        ('{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEv\\n-----END PRIVATE KEY-----\\n"}', "MIIEv"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEv\n-----END RSA PRIVATE KEY-----", "MIIEv"),
        ("signing secret whsec_AbC123xyz", "AbC123xyz"),
        ("Authorization: Bearer eyJhbGci.payload.sig", "eyJhbGci"),
    ],
)
def test_patterns_mask_secrets(text: str, secret: str) -> None:
    assert secret not in r.redact(text)


def test_text_without_secrets_is_unchanged() -> None:
    text = "postgresql://postgres@127.0.0.1:5432/postgres http://127.0.0.1:9050 port 5432: refused"
    assert r.redact(text) == text


def test_registered_secret_is_masked_anywhere_also_percent_decoded() -> None:
    r.register_dsn("postgresql://u:Zq%40secret9@db/x")
    assert r.dsn_password("postgresql://u:Zq%40secret9@db/x") == "Zq%40secret9"
    assert "Zq@secret9" not in r.redact('invalid token "Zq@secret9"')
    assert "Zq%40secret9" not in r.redact("authentication with Zq%40secret9 failed")


def test_log_records_are_redacted_with_their_traceback() -> None:
    r.register_secret("LogSecret77")
    try:
        raise ValueError("connect to postgresql://u:LogSecret77@db/x failed")
    except ValueError as exc:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s: %s", ("oops", exc), None)
        record.exc_info = sys.exc_info()
    r.RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "LogSecret77" not in text and "Traceback" in text and "***" in text


def test_records_without_secrets_keep_their_arguments() -> None:
    """uvicorn's access log formatter unpacks `record.args`: a record with nothing to mask
    must reach it as it was made (flattening it made every request log a traceback)."""
    from uvicorn.logging import AccessFormatter

    args = ("127.0.0.1:5000", "GET", "/api/refresh/status?hours=24", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    r.RedactingFilter().filter(record)
    assert record.args == args
    text = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False).format(
        record
    )
    assert text == '127.0.0.1:5000 - "GET /api/refresh/status?hours=24 HTTP/1.1" 200 OK'


def test_a_secret_in_an_argument_is_masked_in_place() -> None:
    from uvicorn.logging import AccessFormatter

    args = ("127.0.0.1:5000", "GET", "/x?token=SeCrEt1234567", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    r.RedactingFilter().filter(record)
    assert isinstance(record.args, tuple) and "SeCrEt1234567" not in str(record.args)
    text = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False).format(
        record
    )
    assert "SeCrEt1234567" not in text and "token=***" in text


def test_a_secret_in_an_object_argument_flattens_the_message() -> None:
    r.register_secret("ObjSecret99")

    class Holder:
        def __str__(self) -> str:
            return "dsn postgresql://u:ObjSecret99@db/x"

    record = logging.LogRecord("t", logging.INFO, __file__, 1, "using %s", (Holder(),), None)
    r.RedactingFilter().filter(record)
    assert record.args is None and "ObjSecret99" not in record.getMessage() and "***" in record.getMessage()
