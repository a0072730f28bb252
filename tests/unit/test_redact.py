"""Masking of secrets in text and log records (flows.redact)."""

from __future__ import annotations

import logging
import sys

import pytest

from flows import redact as r


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
