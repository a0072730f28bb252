"""`refresh api` (serve the HTTP API and dashboard) and `refresh token create|revoke|list`."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from flows.cli.common import (
    PG_HINT,
    embedded_stack,
    fail,
    load_settings,
    new_grid,
    one_line_errors,
    out,
    ts,
)

token_app = typer.Typer(help="API bearer tokens: create, list, revoke.", no_args_is_help=True)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the token, e.g. airflow-prod")],
    scope: Annotated[
        list[str], typer.Option("--scope", "-s", help="read, trigger (includes read) or admin (everything)")
    ],
    expires_in_days: Annotated[
        int | None,
        typer.Option(min=1, max=3650, help="Refused after this many days (default: valid until revoked)"),
    ] = None,
) -> None:
    """Create a token; it is shown once, only its hash is kept."""
    from flows.control import tokens
    from flows.core.db import connect, migrate

    settings = load_settings()
    expires_at = None if expires_in_days is None else datetime.now(UTC) + timedelta(days=expires_in_days)
    with one_line_errors(PG_HINT):
        migrate(settings)
        with connect(settings) as conn:
            secret, info = tokens.create(conn, settings.control_schema, name, scope, "cli", expires_at)
    until = f", expires {ts(info.expires_at)} UTC" if info.expires_at else ""
    out.print(f"token {info.name} (id {info.token_id}, scopes {', '.join(info.scopes)}{until}):")
    out.print(secret, soft_wrap=True)
    out.print("store it now: it is not shown again. Use it as `Authorization: Bearer <token>`.")


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="Token name or id")]) -> None:
    """Revoke a token: requests with it are refused from now on."""
    from flows.control import tokens
    from flows.core.db import connect, migrate

    settings = load_settings()
    with one_line_errors(PG_HINT):
        migrate(settings)
        with connect(settings) as conn:
            info = tokens.revoke(conn, settings.control_schema, name)
    out.print(f"revoked token {info.name} (id {info.token_id})")


@token_app.command("list")
def token_list(all_: Annotated[bool, typer.Option("--all", help="Include revoked tokens")] = False) -> None:
    """Tokens: id, name, scopes, created, expires, last used, revoked (never the token itself)."""
    from flows.control import tokens
    from flows.core.db import connect, migrate

    settings = load_settings()
    with one_line_errors(PG_HINT):
        migrate(settings)
        with connect(settings) as conn:
            found = tokens.list_tokens(conn, settings.control_schema, include_revoked=all_)
    grid = new_grid(
        "id", "name", "scopes", "created (UTC)", "expires (UTC)", "last used (UTC)", "revoked (UTC)"
    )
    now = datetime.now(UTC)
    for t in found:
        expires = ts(t.expires_at) + (" (expired)" if t.expires_at and t.expires_at <= now else "")
        grid.add_row(
            t.token_id,
            t.name,
            ",".join(t.scopes),
            ts(t.created_at),
            expires,
            ts(t.last_used_at),
            ts(t.revoked_at),
        )
    out.print(grid if found else "no tokens (create one with `refresh token create NAME --scope read`)")


def api(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default REFRESH_API_HOST, 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default REFRESH_API_PORT, 8000)")] = None,
    anonymous_read: Annotated[
        bool | None,
        typer.Option(
            "--anonymous-read/--no-anonymous-read",
            help="Reads without a token for loopback clients (default REFRESH_API_ANONYMOUS_READ); "
            "binds to a loopback address only",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=32, help="uvicorn worker processes (default 1; more use more cores)")
    ] = 1,
    with_stack: Annotated[
        bool, typer.Option("--with-stack/--no-stack", help="Start the embedded parts that are not configured")
    ] = True,
) -> None:
    """Serve the HTTP API (/api/refresh/..., OpenAPI at /api/openapi.json) and the dashboard (/)."""
    overrides = {
        k: v
        for k, v in {"api_host": host, "api_port": port, "api_anonymous_read": anonymous_read}.items()
        if v is not None
    }
    settings = load_settings(prefect_log_level="INFO").model_copy(update=overrides)
    if settings.api_anonymous_read and settings.api_host not in LOOPBACK:
        fail(
            f"anonymous reads are only allowed on a loopback address, not {settings.api_host}",
            "bind to 127.0.0.1, or give readers a token (`refresh token create NAME --scope read`)",
        )
    import uvicorn

    from flows.api.app import create_app

    with one_line_errors(PG_HINT), embedded_stack(settings, with_stack):
        reads = (
            "anonymous reads for loopback clients" if settings.api_anonymous_read else "reads need a token"
        )
        out.print(
            f"dashboard: http://{settings.api_host}:{settings.api_port}/  "
            f"OpenAPI: http://{settings.api_host}:{settings.api_port}/api/openapi.json  ({reads})"
        )
        # Other names (the machine's, a proxy's) are refused until configured: say which pass.
        out.print(f"answers Host: {', '.join(settings.api_allowed_hosts)} (REFRESH_API_ALLOWED_HOSTS)")
        # proxy_headers off: the app itself decides whom X-Forwarded-For may name the client for
        # (REFRESH_API_TRUSTED_PROXIES, flows/api/clients.py); uvicorn would trust 127.0.0.1.
        if workers == 1:
            uvicorn.run(
                create_app(settings), host=settings.api_host, port=settings.api_port, proxy_headers=False
            )
            return
        # Worker processes build their own app from the environment: pass the options on.
        os.environ["REFRESH_API_ANONYMOUS_READ"] = str(settings.api_anonymous_read).lower()
        os.environ["REFRESH_API_HOST"] = settings.api_host
        uvicorn.run(
            "flows.api.app:create_app",
            factory=True,
            workers=workers,
            host=settings.api_host,
            port=settings.api_port,
            proxy_headers=False,
        )
