"""Starting a refresh on request (`POST /api/refresh/trigger`): everything is checked before
anything starts (a repeated Idempotency-Key, what the token may do, a refresh already running,
the once-an-hour limit), then the flow is launched and the trigger recorded. Each refusal is a
`TriggerRefused` naming what to change."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import subprocess
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg

from flows.control import monitoring, registry, triggers
from flows.control.runs import lock_holder
from flows.control.tokens import Scope, TokenInfo
from flows.core import planning
from flows.core.errors import TerminalError
from flows.core.settings import Settings
from flows.core.table_config import Mode, TableConfig
from flows.orchestration import launch
from flows.orchestration.run_params import RunParams
from flows.orchestration.run_plan import select_tables

# A table refreshed successfully this recently is not refreshed again without an admin's force.
MIN_INTERVAL = timedelta(hours=1)


class TriggerRefused(TerminalError):
    """A trigger that started nothing; the message says what to change."""


class KeyReused(TriggerRefused):
    """The Idempotency-Key was sent before with a different request."""


class NeedsAdmin(TriggerRefused):
    """The request asks for what only an admin token may do."""


class TooManySlices(TriggerRefused):
    """The backfill asks for more slices than one trigger may start."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class RefreshBusy(TriggerRefused):
    """A refresh is running; `running` identifies it (run id, or the trigger starting it)."""

    def __init__(self, message: str, running: dict[str, Any]) -> None:
        super().__init__(message)
        self.running = running


class TooSoon(TriggerRefused):
    """Every table asked for was refreshed less than MIN_INTERVAL ago."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LaunchUnavailable(TriggerRefused):
    """The configured Prefect API cannot start the deployment."""


@dataclass(frozen=True)
class Triggered:
    trigger: triggers.Trigger
    replayed: bool  # the same request again under its Idempotency-Key: nothing new started


def request_hash(params: RunParams) -> str:
    return hashlib.sha256(json.dumps(params.to_json(), sort_keys=True).encode()).hexdigest()


def check_scope_and_size(
    settings: Settings, token: TokenInfo, params: RunParams, chosen: list[TableConfig], today: date
) -> None:
    """What a trigger token may not do: refresh a table an admin disabled (that needs admin),
    or ask for more slices than REFRESH_API_MAX_SLICES."""
    disabled = [c.table_name for c in chosen if not c.enabled or c.mode is Mode.DISABLED]
    if disabled and not token.allows(Scope.ADMIN):
        raise NeedsAdmin(
            f"table(s) {', '.join(disabled)} are disabled: refreshing a disabled table needs a token "
            f"with scope 'admin' (token {token.name!r} has {', '.join(s.value for s in token.scopes)})"
        )
    if params.start_date is None:
        return
    end = params.end_date or today
    counts = {c.table_name: planning.requested_slices(c, params.start_date, end) for c in chosen}
    if sum(counts.values()) > settings.api_max_slices:
        per_table = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise TooManySlices(
            f"{params.start_date} to {end} is {sum(counts.values())} slices ({per_table}), more than "
            f"REFRESH_API_MAX_SLICES ({settings.api_max_slices}) one trigger may start: move start_date "
            "later, name fewer tables, or run the backfill with `refresh run`",
            settings.api_max_slices,
        )


def running_refresh(
    conn: psycopg.Connection, schema: str, children: dict[UUID, subprocess.Popen[bytes]]
) -> dict[str, Any] | None:
    """The refresh in progress (the lock is held, or a process this API started is still
    starting or running) with a `detail` describing it, or None. Forgets children that ended."""
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


def _check_interval(
    conn: psycopg.Connection, schema: str, params: RunParams, configs: list[TableConfig], now: datetime
) -> None:
    names = params.tables or [c.table_name for c in configs if c.enabled and c.mode is not Mode.DISABLED]
    last = monitoring.last_successes(conn, schema, names)
    if last and all(s.finished_at and now - s.finished_at < MIN_INTERVAL for s in last):
        oldest = min(s.finished_at for s in last if s.finished_at)
        wait = max(1, math.ceil((oldest + MIN_INTERVAL - now).total_seconds()))
        raise TooSoon(
            f"every table asked for was refreshed less than an hour ago ({', '.join(names)}): "
            f"retry in {wait}s, or set force with an admin token",
            wait,
        )


def trigger_refresh(
    conn: psycopg.Connection,
    settings: Settings,
    token: TokenInfo,
    params: RunParams,
    idempotency_key: str | None,
    children: dict[UUID, subprocess.Popen[bytes]],
    now: datetime,
) -> Triggered:
    """Start a refresh: a flow run of the API's deployment when a Prefect API is configured,
    else the flow in a background process (kept in `children`). Serialised with every other
    trigger; the same key with the same request gets the recorded trigger back."""
    schema = settings.control_schema
    digest = request_hash(params)
    with conn.transaction():
        triggers.lock(conn)
        if idempotency_key is not None:
            seen = triggers.by_key(conn, schema, token.token_id, idempotency_key)
            if seen is not None:
                if seen.request_sha256 != digest:
                    raise KeyReused("this Idempotency-Key was used for a different request: use a new key")
                return Triggered(seen, replayed=True)
        configs = registry.load_all(conn, schema)
        chosen = select_tables(configs, params.tables, force=params.force, now=now)
        check_scope_and_size(settings, token, params, chosen, now.date())
        busy = running_refresh(conn, schema, children)
        if busy is not None:
            raise RefreshBusy(
                f"a refresh is running ({busy.pop('detail')}): try again when it ends", running=busy
            )
        if not (params.force and token.allows(Scope.ADMIN)):
            _check_interval(conn, schema, params, configs, now)
        trigger_id = uuid4()
        flow_run_id: UUID | None = None
        pid: int | None = None
        if launch.prefect_configured(settings.local_prefect_api):
            prefect_key = idempotency_key
            if prefect_key is not None and triggers.key_used(conn, schema, prefect_key):
                # Prefect's keys are per deployment: another token's run must not come back here.
                prefect_key = f"{prefect_key}:{token.token_id}"
            try:
                flow_run_id = launch.start_flow_run(settings.api_deployment, params, prefect_key)
            except launch.DeploymentMissing as exc:
                raise LaunchUnavailable(str(exc)) from None
            via = "prefect"
        else:
            proc = launch.start_process(params, settings.state_dir / "logs")
            children[trigger_id] = proc
            pid, via = proc.pid, "process"
        triggers.record(
            conn,
            schema,
            trigger_id=trigger_id,
            idempotency_key=idempotency_key,
            request_sha256=digest,
            params=launch.flow_parameters(params),
            via=via,
            flow_run_id=flow_run_id,
            pid=pid,
            hostname=socket.gethostname(),
            token_id=token.token_id,
        )
        recorded = triggers.get(conn, schema, trigger_id)
    assert recorded is not None
    return Triggered(recorded, replayed=False)
