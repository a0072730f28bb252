"""The error hierarchy: transient errors are retried, terminal ones stop and say what to fix."""

from __future__ import annotations


class RefreshError(Exception):
    """Base class for every error this package raises on purpose."""


class TransientError(RefreshError):
    """A failure that may succeed when retried (rate limits, 5xx, timeouts, resets)."""


class TerminalError(RefreshError):
    """A failure that will not go away by retrying: the message says what to fix."""


class ConfigError(TerminalError):
    """Bad configuration: settings, the table registry file, credentials, names."""


class SchemaDriftError(TerminalError):
    """The source schema changed in a way the raw table cannot follow automatically."""


class SourceError(TerminalError):
    """BigQuery refused the request for a reason retrying cannot fix."""


class StackError(TerminalError):
    """The embedded local stack (Postgres or the BigQuery emulator) could not start."""


class LockLostError(TerminalError):
    """This run no longer holds the refresh lock (Postgres restarted, or its session ended)."""


class PostgresLostError(RefreshError):
    """Postgres went away during a run and did not come back within the retry budget."""


class BadSourceValueError(TerminalError):
    """A source value Postgres cannot store (a NUL character in a string)."""


def one_line(error: BaseException | str | None) -> str:
    """An error (or an error's text) in one line: its first non-blank line, stripped; "" for no
    text, an exception's type name when it has none.

    A Postgres error's text adds DETAIL and CONTEXT lines that may quote the row a COPY was at:
    only its primary message is kept, so no row data reaches an audit row or a log. Secrets are
    the caller's concern (flows.core.redact).
    """
    if isinstance(error, BaseException):
        primary = getattr(getattr(error, "diag", None), "message_primary", None)
        return one_line(primary or str(error)) or type(error).__name__
    return next((line.strip() for line in (error or "").splitlines() if line.strip()), "")
