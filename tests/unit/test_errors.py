"""One error in one line (flows.core.errors.one_line): for logs, audit rows and the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flows.core.errors import TransientError, one_line


class _PgLikeError(Exception):
    """Carries a `diag` as psycopg's errors do."""

    def __init__(self, text: str, primary: str | None) -> None:
        super().__init__(text)
        self.diag = SimpleNamespace(message_primary=primary)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TransientError("\n  slice 2026-02-01: reset  \nTraceback line\n"), "slice 2026-02-01: reset"),
        (ValueError(""), "ValueError"),
        (RuntimeError("   \n \n"), "RuntimeError"),
        ("\n\n  dbt: model failed \n  details", "dbt: model failed"),
        ("", ""),
        (None, ""),
        ("  \n\t\n", ""),
    ],
)
def test_one_line_is_the_first_non_blank_line(error: BaseException | str | None, expected: str) -> None:
    assert one_line(error) == expected


def test_a_postgres_error_is_its_primary_message_without_the_row_it_was_at() -> None:
    exc = _PgLikeError(
        'invalid byte sequence for encoding "UTF8": 0x00\nCONTEXT:  COPY t, line 3: "secret row"',
        'invalid byte sequence for encoding "UTF8": 0x00',
    )
    assert one_line(exc) == 'invalid byte sequence for encoding "UTF8": 0x00'
    # without a server message (a connection error), the first line of its text
    assert (
        one_line(_PgLikeError("connection refused\n\tIs the server running?", None)) == "connection refused"
    )
