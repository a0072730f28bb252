"""A run's parameters: checked before anything is touched (the validate step)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flows.core.errors import ConfigError
from flows.core.identifiers import validate_pg_identifier
from flows.engine.table_refresh import RefreshOptions

MAX_TRIGGER_LENGTH = 40
SCHEDULE_TRIGGER = "schedule"


@dataclass(frozen=True)
class RunParams:
    """The flow's parameters after validation (what the audit row records)."""

    tables: list[str] | None = None
    start_date: date | None = None
    end_date: date | None = None
    full_refresh: bool = False
    dry_run: bool = False
    force: bool = False
    trigger: str = "manual"

    @property
    def scheduled(self) -> bool:
        """Started by the deployment's schedule (which sets trigger `schedule`): it sets the cadence."""
        return self.trigger == SCHEDULE_TRIGGER

    @property
    def options(self) -> RefreshOptions:
        return RefreshOptions(self.start_date, self.end_date, self.full_refresh, self.dry_run)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def validate_params(
    tables: list[str] | None = None,
    start_date: date | None = None,
    end_date: date | None = None,
    full_refresh: bool = False,
    dry_run: bool = False,
    force: bool = False,
    trigger: str = "manual",
    *,
    today: date | None = None,
) -> RunParams:
    """Check the parameters before anything is touched; every problem says what to change.

    Types (dates, booleans, a list of names) are already checked by Prefect from the flow's
    signature, for runs started from the UI or the API too; these are the rules between them.
    """
    today = today or datetime.now(UTC).date()
    # A day of slack: a caller east of UTC may already be on tomorrow's date.
    latest = today + timedelta(days=1)
    problems = []
    if start_date and end_date and start_date > end_date:
        problems.append(f"start_date {start_date} is after end_date {end_date}")
    for name, value in (("start_date", start_date), ("end_date", end_date)):
        if value and value > latest:
            problems.append(f"{name} {value} is in the future (today is {today} UTC)")
    if full_refresh and (start_date or end_date):
        problems.append("full_refresh reloads whole tables: leave start_date/end_date empty, or drop it")
    names: list[str] = []
    for raw in tables or []:
        name = raw.strip()
        if not name:
            continue
        try:
            names.append(validate_pg_identifier(name, "table name"))
        except ConfigError as exc:
            problems.append(str(exc))
    trigger = trigger.strip()
    if not trigger or len(trigger) > MAX_TRIGGER_LENGTH:
        problems.append(f"trigger must be 1-{MAX_TRIGGER_LENGTH} characters")
    if problems:
        raise ConfigError("invalid run parameters: " + "; ".join(problems))
    return RunParams(
        tables=list(dict.fromkeys(names)) or None,
        start_date=start_date,
        end_date=end_date,
        full_refresh=full_refresh,
        dry_run=dry_run,
        force=force,
        trigger=trigger,
    )
