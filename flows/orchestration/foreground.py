"""A daily refresh in this process (`refresh run`, `refresh backfill`, the demo): the refresh
lock first, then Prefect, then the flow, which adopts the lock."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from flows.core.settings import Settings


def start_ephemeral_prefect(settings: Settings) -> None:
    """Without PREFECT_API_URL each command starts Prefect's ephemeral server on the SQLite
    database under the state directory; started together they race creating its tables and
    block types (UNIQUE-constraint tracebacks, start-up timeouts). One at a time."""
    import fcntl

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with (settings.state_dir / "prefect-start.lock").open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        SubprocessASGIServer().start()  # the client reuses this one (a per-process singleton)


def refresh_here(
    settings: Settings,
    params: dict[str, Any],
    *,
    trigger: str,
    display: Callable[[], AbstractContextManager[object]],
) -> dict[str, Any]:
    """The daily_refresh flow in this process; its summary. `display` wraps the flow run (the
    CLI's progress)."""
    from flows.control.runs import refresh_lock

    # The refresh lock before Prefect: Postgres unreachable, or another refresh running, is
    # one line now; the refused command has started nothing (no Prefect server, no flow
    # run, not even Prefect's import) and exits at once. The flow run adopts this lock.
    with refresh_lock(settings, trigger=trigger) as lock_conn:
        from flows.orchestration.daily_refresh import daily_refresh, lock_taken_by_caller

        start_ephemeral_prefect(settings)
        with lock_taken_by_caller(lock_conn), display():
            summary: dict[str, Any] = daily_refresh(**params, trigger=trigger)  # type: ignore[assignment]
    return summary
