"""The Prefect deployments: the daily refresh on its cron, housekeeping every hour.

Housekeeping's deployment has a second, weekly schedule that also runs the full `dbt test`
(every test over every row: the daily runs test only the periods they rebuilt).

`refresh serve` runs both on this machine with prefect's `serve`; prefect.yaml declares the
same two deployments for a work pool (`prefect deploy --all`). The names are the same either
way: `daily-refresh/daily` and `housekeeping/hourly`.

One refresh at a time, twice over:
- the deployment's concurrency limit is 1 with collision strategy ENQUEUE: a run started
  while another is running waits in Prefect (state AwaitingConcurrencySlot) and starts when
  the first ends, so a manual run clicked during the nightly one is not lost;
- the Postgres advisory lock (flows.control.runs.refresh_lock) covers every other way in (the CLI,
  a second deployment or server): a run that finds the lock held fails at once, having
  changed nothing, with a message naming the run that holds it.
Housekeeping has its own limit of 1 with CANCEL_NEW: an hourly run that finds the previous
one still going is dropped, the next hour does the same work.
"""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType
from pydantic import ValidationError

from flows.core.errors import ConfigError
from flows.core.settings import Settings
from flows.orchestration.daily_refresh import daily_refresh
from flows.orchestration.housekeeping import housekeeping

DAILY_DEPLOYMENT = "daily"
HOUSEKEEPING_DEPLOYMENT = "hourly"
# Half past every hour: away from the refresh's usual start on the hour.
HOUSEKEEPING_CRON = "30 * * * *"
# Weekly, the same deployment also runs the full `dbt test`
# (flows.orchestration.housekeeping.run_full_dbt_test): Sundays 04:45, a quarter of an hour
# after that hour's housekeeping run, which has ended by then (a run finding the previous one
# still going is dropped, see below).
FULL_DBT_TEST_CRON = "45 4 * * 0"
TAGS = ["sqp-refresh"]

REFRESH_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
HOUSEKEEPING_CONCURRENCY = ConcurrencyLimitConfig(
    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
)


def validate_schedule(cron: str, timezone: str) -> None:
    """A cron expression and an IANA time zone Prefect accepts, or a ConfigError naming the fix."""
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(
            f"bad schedule {cron!r} in time zone {timezone!r} ({why}): set REFRESH_SCHEDULE_CRON "
            "(5 fields, e.g. '0 2 * * *') and REFRESH_SCHEDULE_TIMEZONE (IANA name, e.g. 'Europe/Berlin')"
        ) from exc


def daily_refresh_deployment(settings: Settings) -> RunnerDeployment:
    validate_schedule(settings.schedule_cron, settings.schedule_timezone)
    deployment = daily_refresh.to_deployment(
        name=DAILY_DEPLOYMENT,
        schedules=[
            Cron(
                settings.schedule_cron,
                timezone=settings.schedule_timezone,
                parameters={"trigger": "schedule"},
            )
        ],
        concurrency_limit=REFRESH_CONCURRENCY,
        tags=TAGS,
        # The package is installed: load the flow by module, wherever the process starts.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    assert isinstance(deployment, RunnerDeployment)  # called outside an event loop: not a coroutine
    return deployment


def housekeeping_deployment(settings: Settings) -> RunnerDeployment:
    validate_schedule(HOUSEKEEPING_CRON, settings.schedule_timezone)
    deployment = housekeeping.to_deployment(
        name=HOUSEKEEPING_DEPLOYMENT,
        schedules=[
            Cron(HOUSEKEEPING_CRON, timezone=settings.schedule_timezone),
            Cron(
                FULL_DBT_TEST_CRON,
                timezone=settings.schedule_timezone,
                parameters={"full_dbt_test": True},
            ),
        ],
        concurrency_limit=HOUSEKEEPING_CONCURRENCY,
        tags=TAGS,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    assert isinstance(deployment, RunnerDeployment)  # called outside an event loop: not a coroutine
    return deployment


def build_deployments(settings: Settings) -> list[RunnerDeployment]:
    return [daily_refresh_deployment(settings), housekeeping_deployment(settings)]


def serve_deployments(settings: Settings, limit: int | None = None) -> None:
    """Register both deployments and run their flow runs on this machine until interrupted."""
    serve(*build_deployments(settings), limit=limit)
