"""The app factory: settings, a connection pool, the routes, problem+json errors."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from flows import runbook
from flows.api import dashboard, problems, rollout_routes, routes, webhook_routes
from flows.api.responses import FastJSONResponse
from flows.api.status_cache import StatusCache
from flows.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The same start as every CLI command that reads the registry: schema migrated, the
        # registry file synced in.
        runbook.prepare(settings)
        # Opened up front: a burst of requests does not wait for new connections.
        options: dict[str, Any] = {
            "min_size": settings.api_pool_size,
            "max_size": settings.api_pool_size,
            "kwargs": {"autocommit": True, "application_name": "sqp-refresh-api"},
            "open": False,
        }
        pool: ConnectionPool = ConnectionPool(settings.dsn(), **options)
        pool.open(wait=True, timeout=30)
        # The hot reads (token checks, status, history) run on the event loop with async
        # connections: no thread hop per request.
        apool: AsyncConnectionPool = AsyncConnectionPool(settings.dsn(), **options)
        try:
            await apool.open(wait=True, timeout=30)
        except BaseException:
            pool.close()
            raise
        app.state.pool = pool
        app.state.apool = apool
        try:
            yield
        finally:
            await apool.close()
            pool.close()

    app = FastAPI(
        title="sqp-refresh API",
        version="1",
        description="See and start the daily BigQuery -> Postgres refresh. Errors are RFC 9457 "
        "problem details (application/problem+json). Bearer tokens: `refresh token create`.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
    )
    app.state.settings = settings
    app.state.status_cache = StatusCache(settings.api_status_cache_seconds)
    # Background refreshes this process started (no Prefect API): trigger id -> process.
    app.state.children = dict[UUID, subprocess.Popen[bytes]]()
    problems.install(app)
    app.include_router(routes.router)
    app.include_router(rollout_routes.router)
    app.include_router(webhook_routes.router)
    app.include_router(dashboard.router)
    return app
