"""The /api/refresh endpoints: each parses its input, calls the plain functions the CLI and
the flow call (flows.core.table_config, flows.orchestration.runbook, flows.control), and formats."""

from __future__ import annotations

import hashlib
import json
import math
import socket
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID, uuid4

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from flows.api import launch
from flows.api.auth import require
from flows.api.problems import Problem
from flows.api.responses import FastJSONResponse
from flows.control import monitoring, registry, triggers
from flows.control.history import (
    MAX_PAGE_SIZE,
    HistoryCursor,
    HistoryQuery,
    history_after_async,
    read_history_async,
)
from flows.control.runs import lock_holder, refresh_running
from flows.control.tokens import Scope, TokenInfo
from flows.core import planning
from flows.core.errors import ConfigError
from flows.core.settings import Settings
from flows.core.table_config import ChangeDetection, Mode, SliceSize, TableConfig, WriteStrategy
from flows.orchestration import runbook

router = APIRouter(prefix="/api/refresh")
Reader = Annotated[TokenInfo | None, Depends(require(Scope.READ))]
Triggerer = Annotated[TokenInfo | None, Depends(require(Scope.TRIGGER))]
Admin = Annotated[TokenInfo | None, Depends(require(Scope.ADMIN))]

DEFAULT_STATUS_HOURS = 24
# A table refreshed successfully this recently is not refreshed again without `force`.
MIN_INTERVAL = timedelta(hours=1)
PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or an unknown or revoked one", **PROBLEM},
    403: {"description": "The token lacks the scope", **PROBLEM},
    422: {"description": "Invalid input: each field and its problem", **PROBLEM},
}


def _schema(request: Request) -> str:
    return str(request.app.state.settings.control_schema)


def _now() -> datetime:
    return datetime.now(UTC)


def status_answer(pool: ConnectionPool, schema: str, hours: int) -> bytes:
    """The status body for runs of the last `hours` hours, rendered."""
    now = _now()
    with pool.connection() as conn:
        running = refresh_running(conn)
        runs = monitoring.runs_since(conn, schema, now - timedelta(hours=hours))
        tables = monitoring.table_overview(conn, schema, now)
    state, reasons = monitoring.health(tables, runs)
    return FastJSONResponse.dumps(
        {
            "status": state.value,
            "reasons": reasons,
            "refresh_running": running,
            "generated_at": now,
            "hours": hours,
            "runs": runs,
            "tables": tables,
        }
    )


@router.get("/status", response_model=None, responses=COMMON_ERRORS)
async def status(
    request: Request,
    _: Reader,
    hours: Annotated[int, Query(ge=1, le=720, description="Runs of the last N hours")] = DEFAULT_STATUS_HOURS,
) -> Response:
    """healthy / degraded / failing, why, and per table: mode, last status, last success,
    freshness (fresh, aging > 1x frequency, stale > 2x, never) and next due. The answer may be
    up to REFRESH_API_STATUS_CACHE_SECONDS old: the Age header says how old (seconds), and
    `generated_at` when it was computed."""

    def compute() -> bytes:
        return status_answer(request.app.state.pool, _schema(request), hours)

    cache = request.app.state.status_cache
    cached = cache.lookup(hours, compute) or await run_in_threadpool(cache.get, hours, compute)
    return Response(cached.body, media_type="application/json", headers={"Age": str(int(cached.age_s()))})


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tables: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=200, description="Registry table names; empty = every due table"
    )
    force: bool = Field(
        default=False,
        description="Refresh even if not due; with an admin token also if refreshed < 1 h ago, or disabled",
    )
    dry_run: bool = Field(default=False, description="Plan only: write nothing")
    start_date: date | None = Field(default=None, description="Reload from this date (backfill)")
    end_date: date | None = Field(default=None, description="Reload up to this date, inclusive")


def _request_hash(params: runbook.RunParams) -> str:
    return hashlib.sha256(json.dumps(params.to_json(), sort_keys=True).encode()).hexdigest()


def _trigger_body(t: triggers.Trigger, replayed: bool) -> dict[str, Any]:
    return {
        "trigger_id": t.trigger_id,
        "run_id": t.run_id,
        "run_status": t.run_status,
        # why no run began: another refresh took the lock before the started process did
        "refused": t.refused,
        "flow_run_id": t.flow_run_id,
        "via": t.via,
        "params": t.params,
        "created_at": t.created_at,
        "replayed": replayed,
        "links": {
            "trigger": f"/api/refresh/triggers/{t.trigger_id}",
            "run": f"/api/refresh/runs/{t.run_id or t.flow_run_id}" if (t.run_id or t.flow_run_id) else None,
        },
    }


def _accepted(t: triggers.Trigger, replayed: bool) -> JSONResponse:
    return JSONResponse(
        jsonable_encoder(_trigger_body(t, replayed)),
        status_code=202,
        headers={"Location": f"/api/refresh/triggers/{t.trigger_id}"},
    )


def _busy(request: Request, conn: Any) -> dict[str, Any] | None:
    """The refresh in progress (the lock is held, or a process this API started is still
    starting or running), or None."""
    schema = _schema(request)
    children = request.app.state.children
    alive = [tid for tid, proc in children.items() if proc.poll() is None]
    for tid in [tid for tid in children if tid not in alive]:
        children.pop(tid)
    holder = lock_holder(conn, schema)
    if holder is not None:
        # the run, or (its run row not written yet) the trigger and process starting it
        return {**holder.to_json(), "detail": holder.describe()}
    if not alive:
        return None
    pending = triggers.get(conn, schema, alive[0])
    return {
        "run_id": pending.run_id if pending else None,
        "trigger_id": alive[0],
        "detail": f"trigger {alive[0]} starting",
    }


def _check_scope_and_size(
    settings: Settings, token: TokenInfo, params: runbook.RunParams, chosen: list[TableConfig], today: date
) -> None:
    """What a trigger token may not do: refresh a table an admin disabled (that needs admin),
    or ask for more slices than REFRESH_API_MAX_SLICES."""
    disabled = [c.table_name for c in chosen if not c.enabled or c.mode is Mode.DISABLED]
    if disabled and not token.allows(Scope.ADMIN):
        raise Problem(
            403,
            f"table(s) {', '.join(disabled)} are disabled: refreshing a disabled table needs a token "
            f"with scope 'admin' (token {token.name!r} has {', '.join(s.value for s in token.scopes)})",
        )
    if params.start_date is None:
        return
    end = params.end_date or today
    counts = {c.table_name: planning.requested_slices(c, params.start_date, end) for c in chosen}
    if sum(counts.values()) > settings.api_max_slices:
        per_table = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise Problem(
            422,
            f"{params.start_date} to {end} is {sum(counts.values())} slices ({per_table}), more than "
            f"REFRESH_API_MAX_SLICES ({settings.api_max_slices}) one trigger may start: move start_date "
            "later, name fewer tables, or run the backfill with `refresh run`",
            errors=[{"field": "start_date", "problem": f"more than {settings.api_max_slices} slices"}],
        )


@router.post(
    "/trigger",
    status_code=202,
    responses={
        **COMMON_ERRORS,
        202: {"description": "Started (or the same run again for a repeated Idempotency-Key)"},
        409: {"description": "A refresh is running: its run id", **PROBLEM},
        429: {"description": "Every table was refreshed < 1 h ago; Retry-After says when", **PROBLEM},
    },
)
def trigger(
    request: Request,
    body: TriggerRequest,
    token: Triggerer,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            pattern=r"^[\x21-\x7e]+$",
            description="Repeat the same key to retry safely: the same request gets the same run back",
        ),
    ] = None,
) -> JSONResponse:
    """Start a refresh: a flow run of the daily-refresh deployment when a Prefect API is
    configured, else the flow in a background process. Everything is checked before anything
    starts."""
    assert token is not None  # only reads may be anonymous
    params = runbook.validate_params(
        body.tables, body.start_date, body.end_date, False, body.dry_run, body.force, trigger="api"
    )
    schema = _schema(request)
    state = request.app.state
    now = _now()
    request_hash = _request_hash(params)
    with state.pool.connection() as conn, conn.transaction():
        triggers.lock(conn)
        if idempotency_key is not None:
            seen = triggers.by_key(conn, schema, token.token_id, idempotency_key)
            if seen is not None:
                if seen.request_sha256 != request_hash:
                    raise Problem(
                        422,
                        "this Idempotency-Key was used for a different request: use a new key",
                        errors=[{"field": "Idempotency-Key", "problem": "reused with a different body"}],
                    )
                return _accepted(seen, replayed=True)
        configs = registry.load_all(conn, schema)
        chosen = runbook.select_tables(configs, params.tables, force=params.force, now=now)
        _check_scope_and_size(state.settings, token, params, chosen, now.date())
        busy = _busy(request, conn)
        if busy is not None:
            raise Problem(
                409,
                f"a refresh is running ({busy.pop('detail')}): try again when it ends",
                **jsonable_encoder(busy),
            )
        if not (params.force and token.allows(Scope.ADMIN)):
            names = params.tables or [
                c.table_name for c in configs if c.enabled and c.mode is not Mode.DISABLED
            ]
            last = monitoring.last_successes(conn, schema, names)
            if last and all(s.finished_at and now - s.finished_at < MIN_INTERVAL for s in last):
                oldest = min(s.finished_at for s in last if s.finished_at)
                wait = max(1, math.ceil((oldest + MIN_INTERVAL - now).total_seconds()))
                raise Problem(
                    429,
                    f"every table asked for was refreshed less than an hour ago ({', '.join(names)}): "
                    f"retry in {wait}s, or set force with an admin token",
                    headers={"Retry-After": str(wait)},
                    retry_after_s=wait,
                )
        trigger_id = uuid4()
        flow_run_id: UUID | None = None
        pid: int | None = None
        if launch.prefect_configured(state.settings.local_prefect_api):
            prefect_key = idempotency_key
            if prefect_key is not None and triggers.key_used(conn, schema, prefect_key):
                # Prefect's keys are per deployment: another token's run must not come back here.
                prefect_key = f"{prefect_key}:{token.token_id}"
            try:
                flow_run_id = launch.start_flow_run(state.settings.api_deployment, params, prefect_key)
            except launch.DeploymentMissing as exc:
                raise Problem(503, str(exc)) from None
            via = "prefect"
        else:
            proc = launch.start_process(params, state.settings.state_dir / "logs")
            state.children[trigger_id] = proc
            pid, via = proc.pid, "process"
        triggers.record(
            conn,
            schema,
            trigger_id=trigger_id,
            idempotency_key=idempotency_key,
            request_sha256=request_hash,
            params=launch.flow_parameters(params),
            via=via,
            flow_run_id=flow_run_id,
            pid=pid,
            hostname=socket.gethostname(),
            token_id=token.token_id,
        )
        recorded = triggers.get(conn, schema, trigger_id)
    state.status_cache.clear()
    assert recorded is not None
    return _accepted(recorded, replayed=False)


@router.get(
    "/triggers/{trigger_id}",
    response_model=None,
    responses={**COMMON_ERRORS, 404: {"description": "Unknown", **PROBLEM}},
)
def get_trigger(request: Request, _: Reader, trigger_id: UUID) -> dict[str, Any]:
    """A trigger and the run it started (run_id is null until the run has begun)."""
    with request.app.state.pool.connection() as conn:
        t = triggers.get(conn, _schema(request), trigger_id)
    if t is None:
        raise Problem(404, f"no trigger {trigger_id}")
    return _trigger_body(t, replayed=False)


Page = Annotated[int, Query(ge=1, le=1_000_000, description="Page number, from 1")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Rows per page")]
Since = Annotated[date | None, Query(description="Started on or after (YYYY-MM-DD)")]
Until = Annotated[date | None, Query(description="Started on or before (YYYY-MM-DD)")]


Cursor = Annotated[
    str | None,
    Query(
        max_length=200,
        description="next_cursor of the previous page: the page after it (keyset paging, no total); "
        "instead of page",
    ),
]


async def _page(request: Request, q: HistoryQuery, cursor: str | None = None) -> FastJSONResponse:
    """A page by number (with the total), or the page after a cursor."""
    if cursor is not None:
        if q.page != 1:
            raise Problem(
                422,
                "give page or cursor, not both",
                errors=[{"field": "cursor", "problem": "cannot be combined with page"}],
            )
        try:
            after = HistoryCursor.decode(cursor)
        except ConfigError as exc:
            raise Problem(422, str(exc), errors=[{"field": "cursor", "problem": str(exc)}]) from None
        async with request.app.state.apool.connection() as conn:
            rows, next_cursor = await history_after_async(conn, _schema(request), q, after)
        return FastJSONResponse(
            {"page_size": q.page_size, "cursor": cursor, "next_cursor": next_cursor, "items": rows}
        )
    async with request.app.state.apool.connection() as conn:
        result = await read_history_async(conn, _schema(request), q)
    return FastJSONResponse(
        {
            "page": q.page,
            "page_size": q.page_size,
            "total": result.total,
            "pages": max(1, -(-result.total // q.page_size)),
            "next_cursor": result.next_cursor,
            "items": result.rows,
        }
    )


@router.get("/runs", response_model=None, responses=COMMON_ERRORS)
async def runs(
    request: Request,
    _: Reader,
    status: Annotated[
        str | None, Query(max_length=20, description="running, success, warning, failed or abandoned")
    ] = None,
    since: Since = None,
    until: Until = None,
    page: Page = 1,
    page_size: PageSize = 20,
    cursor: Cursor = None,
) -> FastJSONResponse:
    """Runs, newest first, paged by `page` or after a `cursor` (see /history)."""
    q = HistoryQuery(status=status, since=since, until=until, page=page, page_size=page_size)
    return await _page(request, q, cursor)


@router.get(
    "/runs/{run_id}",
    response_model=None,
    responses={**COMMON_ERRORS, 404: {"description": "Unknown run", **PROBLEM}},
)
def run(request: Request, _: Reader, run_id: UUID) -> FastJSONResponse:
    """One run (by run id or Prefect flow run id): its tables, slices and dbt nodes."""
    with request.app.state.pool.connection() as conn:
        detail = monitoring.run_detail(conn, _schema(request), run_id)
    if detail is None:
        raise Problem(404, f"no run {run_id} (see /api/refresh/runs)")
    return FastJSONResponse(detail)


@router.get("/history", response_model=None, responses=COMMON_ERRORS)
async def history(
    request: Request,
    _: Reader,
    table: Annotated[
        str | None, Query(max_length=63, description="One table's refreshes instead of runs")
    ] = None,
    status: Annotated[str | None, Query(max_length=20, description="Only this status")] = None,
    since: Since = None,
    until: Until = None,
    page: Page = 1,
    page_size: PageSize = 20,
    cursor: Cursor = None,
) -> FastJSONResponse:
    """Past runs, or one table's refreshes, newest first, filtered and paged (page_size <= 100):
    by `page` (with the total), or after a `cursor` (every page as fast as the first). Each
    page has `next_cursor` (null on the last)."""
    q = HistoryQuery(table=table, status=status, since=since, until=until, page=page, page_size=page_size)
    return await _page(request, q, cursor)


@router.get("/metrics", response_model=None, responses=COMMON_ERRORS)
def metrics(
    request: Request, _: Reader, days: Annotated[int, Query(ge=1, le=30, description="Window in days")] = 7
) -> dict[str, Any]:
    """Success rate, p50/p95 duration and rows/s: overall, per table and per dbt model."""
    since = _now() - timedelta(days=days)
    with request.app.state.pool.connection() as conn:
        return {"days": days, "since": since, **monitoring.metrics(conn, _schema(request), since)}


TablePath = Annotated[str, Path(max_length=63, description="Registry table name")]


def _config_json(cfg: TableConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


@router.get("/config", response_model=None, responses=COMMON_ERRORS)
def config_list(request: Request, _: Reader) -> list[dict[str, Any]]:
    """The table registry, highest priority first."""
    with request.app.state.pool.connection() as conn:
        return [_config_json(c) for c in registry.load_all(conn, _schema(request))]


def _find(request: Request, conn: Any, table: str) -> TableConfig:
    for cfg in registry.load_all(conn, _schema(request)):
        if cfg.table_name == table:
            return cfg
    raise Problem(404, f"table {table!r} is not in the registry (see /api/refresh/config)")


@router.get(
    "/config/{table}",
    response_model=None,
    responses={**COMMON_ERRORS, 404: {"description": "Unknown table", **PROBLEM}},
)
def config_get(request: Request, _: Reader, table: TablePath) -> dict[str, Any]:
    """Every setting of one table."""
    with request.app.state.pool.connection() as conn:
        return _config_json(_find(request, conn, table))


class ConfigChanges(BaseModel):
    """Fields to change; the row then keeps its edits when the registry file changes."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    # Mode changes only by cutover/rollback (validation gate, `mode_changes` row, rollback):
    # refused here by name, and left out of the OpenAPI document.
    mode: SkipJsonSchema[Any] = None
    priority: int | str | None = Field(
        default=None, description="0-1000, or critical/high/medium/low/background"
    )
    refresh_frequency_hours: int | None = None
    next_refresh_at: datetime | None = None
    cursor_column: str | None = Field(default=None, max_length=300)
    slice_size: SliceSize | None = None
    lookback_days: int | None = None
    write_strategy: WriteStrategy | None = None
    custom_params: dict[str, Any] | None = None
    change_detection: ChangeDetection | None = None

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        raise ValueError(
            "a table's mode changes only through POST /api/refresh/config/{table}/cutover "
            "(dry_run -> shadow -> live, validated) or /rollback, which audit the change"
        )


@router.put(
    "/config/{table}",
    response_model=None,
    responses={**COMMON_ERRORS, 404: {"description": "Unknown table", **PROBLEM}},
)
def config_put(request: Request, token: Admin, table: TablePath, body: ConfigChanges) -> dict[str, Any]:
    """Change settings of one table, validated as `refresh config set` does."""
    changes = body.model_dump(include=body.model_fields_set)
    if not changes:
        raise Problem(
            422, "nothing to change: send at least one field", errors=[{"field": "body", "problem": "empty"}]
        )
    who = f"api:{token.name}" if token else "api"
    with request.app.state.pool.connection() as conn, conn.transaction():
        _find(request, conn, table)
        new = registry.update(conn, _schema(request), table, changes, who=who)
    request.app.state.status_cache.clear()
    return _config_json(new)


@router.get("/dashboard", response_model=None, responses=COMMON_ERRORS)
def dashboard_data(
    request: Request,
    _: Reader,
    days: Annotated[int, Query(ge=1, le=30, description="Trend window in days")] = 30,
) -> dict[str, Any]:
    """What the dashboard draws: the run timeline and failures of the last 7 days, and
    duration trends per table and per dbt model over `days`."""
    now = _now()
    week = now - timedelta(days=7)
    schema = _schema(request)
    with request.app.state.pool.connection() as conn:
        return {
            "generated_at": now,
            "timeline": monitoring.runs_since(conn, schema, week, limit=500),
            "failures": monitoring.failures(conn, schema, week),
            "trends": monitoring.duration_trends(conn, schema, now - timedelta(days=days)),
        }
