"""What every command shares: the console, settings, one-line errors and option parsing."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.core.errors import ConfigError, RefreshError, one_line
from flows.core.redact import redact
from flows.core.settings import Settings, get_settings

# What the Makefile exports, for a CLI started any other way (a shell, cron, CI): no usage
# statistics sent by Prefect's local server or dbt (and no notice about them). Set before
# Prefect or dbt is imported (every command module imports this one first); a value the user
# set wins. PREFECT_HOME: see _prefect_env.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
# pgserver asks platformdirs for a runtime directory when it is imported; without
# XDG_RUNTIME_DIR (cron, containers, ssh) platformdirs warns on every command and falls back
# to a private directory under /tmp, which is all the embedded Postgres needs.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")

out = Console(highlight=False)
# Output that is not a terminal (a pipe, a file, CI logs, cron mail) has no width to fit:
# rich would assume 80 columns and wrap table cells mid-word.
PIPE_WIDTH = 1000
PG_HINT = "is Postgres up? (`refresh stack up` for the embedded one, else check REFRESH_PG_DSN)"
EXIT_WARNING = 2

TablesOption = Annotated[
    list[str] | None,
    typer.Option("--tables", "-t", help="Tables to refresh (repeat, or comma-separated); default: all due"),
]
WithStackOption = Annotated[
    bool, typer.Option("--with-stack/--no-stack", help="Start the embedded parts that are not configured")
]


def _prefect_env(settings: Settings, log_level: str) -> None:
    """Project-local Prefect home unless the user configured Prefect themselves."""
    os.environ.setdefault("PREFECT_HOME", str(settings.state_dir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", log_level)
    # Prefect's 20 s for its ephemeral server is too short when several commands start at once
    # on a small machine (each migrates the shared SQLite database).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Prefect cannot create its home (and its database) under a state directory that is missing.
    with contextlib.suppress(OSError):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def load_settings(prefect_log_level: str = "WARNING") -> Settings:
    try:
        s = get_settings()
    except ConfigError as exc:  # one line per bad setting, secrets masked
        fail(f"configuration error: {exc}", "check the REFRESH_* environment variables (or .env)")
    _prefect_env(s, prefect_log_level)
    return s


def exit_for(summary: dict[str, Any]) -> None:
    """A warning must not look like a success to a script, cron or CI: exit code 2."""
    from flows.control.runs import RunStatus

    if summary["status"] == RunStatus.WARNING:
        raise typer.Exit(EXIT_WARNING)
    if summary["status"] != RunStatus.SUCCESS:
        raise typer.Exit(1)


# C0 and C1 control characters and DEL: an ESC starts a terminal escape sequence.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def no_controls(text: object) -> str:
    """Text from outside (a receiver, a row, an error) with its control characters removed, so
    it cannot move the cursor, retitle or clear the operator's terminal; line breaks and tabs
    become spaces."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\t\n\r" else "", str(text))


def plain(text: object) -> str:
    """Text from outside, safe to print with `out`: no control characters, markup escaped
    (a `[/]` in a receiver's answer would otherwise crash Rich or restyle the output)."""
    return escape(no_controls(text))


def fail(message: str, hint: str | None = None) -> NoReturn:
    typer.secho(f"error: {no_controls(redact(message))}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {no_controls(redact(hint))}", err=True)
    raise typer.Exit(1)


def _postgres(settings: Settings | None = None) -> str:
    """Which Postgres, as the user would fix it."""
    if settings is not None and settings.uses_embedded_postgres:
        return f"the embedded Postgres on port {settings.local_pg_port}"
    return "REFRESH_PG_DSN"


@contextlib.contextmanager
def one_line_errors(hint: str | None = None, settings: Settings | None = None) -> Iterator[None]:
    """Our errors and an unreachable Postgres become one line + hint, exit code 1."""
    import psycopg

    try:
        yield
    except ConfigError as exc:
        # A setting or file to fix, not a Postgres to start.
        fail(str(exc), "fix the setting or file named above, then run `refresh validate`")
    except RefreshError as exc:
        fail(str(exc), hint)
    except psycopg.OperationalError as exc:
        fail(f"cannot connect to Postgres ({_postgres(settings)}): {one_line(exc)}", PG_HINT)
    except psycopg.Error as exc:
        fail(f"Postgres refused the request ({_postgres(settings)}): {one_line(exc)}", hint)


def parse_date(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        fail(f"{option} {value!r} is not a date", "use YYYY-MM-DD, e.g. 2026-01-31")


def split_names(values: list[str] | None) -> list[str] | None:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def embedded_stack(settings: Settings, with_stack: bool) -> contextlib.AbstractContextManager[Any]:
    """The embedded parts that are not configured (`--with-stack`), started for the command."""
    if not with_stack:
        return contextlib.nullcontext()
    from flows.demo.local_stack import local_stack

    return local_stack(settings)


def synced_registry(settings: Settings) -> Any:
    """The registry as it stands (the file synced in first, so file-only tables are there)."""
    from flows.orchestration import run_plan

    return run_plan.prepare(settings)


def new_grid(*columns: str) -> Table:
    """A compact table; in a narrow terminal cells wrap, the first column (a name) does not."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=i == 0, overflow="fold")
    return table


def ts(value: datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def seconds(value: Any) -> str:
    return "running" if value is None else f"{float(value):.1f}s"
