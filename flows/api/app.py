"""The app factory: settings, a connection pool, the routes, problem+json errors."""

from __future__ import annotations

import gc
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from uuid import UUID

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from flows.api import clients, dashboard, problems, rollout_routes, routes, webhook_routes
from flows.api.guards import Guards, host_name
from flows.api.responses import FastJSONResponse
from flows.api.status_cache import StatusCache
from flows.core.db import use_utc, use_utc_async
from flows.core.errors import ConfigError
from flows.core.settings import Settings, get_settings
from flows.orchestration import run_plan

log = logging.getLogger(__name__)
# Bind addresses that are no host name a client would send.
WILDCARD_BINDS = ("0.0.0.0", "::", "")


async def warm_up(app: FastAPI, settings: Settings) -> None:
    """Ready for the first request: the default status answer computed (the first
    computation of a process pays its first-use costs, and every reader of the worker would
    wait for it), then everything alive after start-up moved out of the garbage collector's
    reach (`gc.freeze`): a full collection over the imported modules' objects took ~100 ms,
    a pause of every request in flight on this worker, many times over the API's p99."""
    cache: StatusCache = app.state.status_cache
    hours = routes.DEFAULT_STATUS_HOURS
    try:
        await run_in_threadpool(
            cache.get, hours, partial(routes.status_answer, app.state.pool, settings.control_schema, hours)
        )
    except Exception:  # the first reader computes it and gets the error itself
        log.exception("computing the first status answer failed")
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The same start as every CLI command that reads the registry: schema migrated, the
        # registry file synced in.
        run_plan.prepare(settings)
        # Opened up front: a burst of requests does not wait for new connections.
        options: dict[str, Any] = {
            "min_size": settings.api_pool_size,
            "max_size": settings.api_pool_size,
            "kwargs": {"autocommit": True, "application_name": "sqp-refresh-api"},
            "open": False,
        }
        pool: ConnectionPool = ConnectionPool(settings.dsn(), configure=use_utc, **options)
        pool.open(wait=True, timeout=30)
        # The hot reads (token checks, status, history) run on the event loop with async
        # connections: no thread hop per request.
        apool: AsyncConnectionPool = AsyncConnectionPool(settings.dsn(), configure=use_utc_async, **options)
        try:
            await apool.open(wait=True, timeout=30)
        except BaseException:
            pool.close()
            raise
        app.state.pool = pool
        app.state.apool = apool
        await warm_up(app, settings)
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
        # No Swagger UI page: FastAPI's loads its script from a CDN, inline, on the origin
        # whose sessionStorage holds the dashboard's token. The document is enough for clients.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
    )
    allowed_hosts = list(settings.api_allowed_hosts)
    if settings.api_host not in WILDCARD_BINDS:
        allowed_hosts.append(host_name(settings.api_host))
    if settings.api_anonymous_read and "*" in allowed_hosts:
        raise ConfigError(
            "REFRESH_API_ALLOWED_HOSTS=* with anonymous reads lets any web page read the API through "
            "DNS rebinding: name the hosts, or turn anonymous reads off"
        )
    app.add_middleware(Guards, allowed_hosts=allowed_hosts, max_body=settings.api_max_body_bytes)
    app.state.settings = settings
    app.state.trusted_proxies = clients.networks(settings.api_trusted_proxies)
    app.state.status_cache = StatusCache(settings.api_status_cache_seconds)
    # Background refreshes this process started (no Prefect API): trigger id -> process.
    app.state.children = dict[UUID, subprocess.Popen[bytes]]()
    problems.install(app)
    app.include_router(routes.router)
    app.include_router(rollout_routes.router)
    app.include_router(webhook_routes.router)
    app.include_router(dashboard.router)
    return app
