"""`refresh run --explain`: what a run would read and rebuild, and why, without writing.

Each planned table is planned and fingerprinted as the run would (flows.refresh with
`explain`), nothing else: no run record, no audit row, no checkpoint, no raw row. dbt is only
asked which models its selection holds (`dbt ls`, no database write).
"""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stdout
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from flows import runbook
from flows.bigquery import BigQueryClients
from flows.control import registry
from flows.db import connect
from flows.periods import periods_to_rebuild
from flows.refresh import TableOutcome, refresh_table
from flows.registry import Mode
from flows.settings import Settings
from flows.transform import dbt_env, invoke_dbt, profiles_dir

DBT_SOURCE = "sqp"


@dataclass
class Explanation:
    tables: list[TableOutcome] = field(default_factory=list)
    dbt_select: str | None = None  # the selection of the run's `dbt build` (None: nothing)
    dbt_models: list[str] = field(default_factory=list)
    # The periods dbt rebuilds (flows.periods); None when no table was explained.
    periods: dict[str, list[str]] | None = None
    changed_slices: list[tuple[date, date]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tables": [
                {
                    "table": o.table_name,
                    "status": o.status,
                    "window": None if o.window is None else f"{o.window.first}..{o.window.last}",
                    "slices": o.plan,
                    "error": o.error,
                }
                for o in self.tables
            ],
            "dbt_select": self.dbt_select,
            "dbt_models": self.dbt_models,
            "periods": self.periods,
        }


def read_slices(outcome: TableOutcome) -> list[tuple[date, date]]:
    """The (start, end) of each slice the table's run would read (not the whole-table ones)."""
    out = []
    for s in outcome.plan:
        if s["change"] != "unchanged" and s["slice"] != "full":
            first, end = s["slice"].split("..")
            out.append((date.fromisoformat(first), date.fromisoformat(end)))
    return out


def rebuild_periods(changed: list[tuple[date, date]]) -> dict[str, list[str]]:
    """The dbt periods the changed slices may rebuild: those of their ISO weeks (the var
    refresh_weeks' rule). The run passes dbt the days its slices changed (refresh_days), known
    only once loaded, so it rebuilds these periods or fewer (a week across a month end whose
    rows lie in one month rebuilds that month only)."""
    return periods_to_rebuild(changed).to_dict()


def dbt_models(settings: Settings, select: str) -> list[str]:
    """The models of a selection (`dbt ls`; artifacts in a temporary directory)."""
    # `dbt ls` prints the names itself (even with --quiet): they are printed in the report.
    with tempfile.TemporaryDirectory(prefix="sqp-explain-") as tmp, redirect_stdout(io.StringIO()):
        res = invoke_dbt(
            settings.dbt_project_dir,
            ["ls", "--select", select, "--resource-type", "model", "--output", "name"],
            profiles_dir=profiles_dir(settings),
            target_path=Path(tmp),
            env=dbt_env(settings),
        )
    return sorted(res.result or []) if res.success else []


def explain(
    settings: Settings, clients: BigQueryClients, params: runbook.RunParams, now: datetime
) -> Explanation:
    """Plan, fingerprint and decide every table the run would refresh; write nothing.

    The registry is read as it stands: neither migrated nor synced from the file (a run does
    both first), and new source tables are not registered.
    """
    with connect(settings, autocommit=True) as conn:
        configs = registry.load_all(conn, settings.control_schema)
    chosen = runbook.select_tables(configs, params.tables, force=params.force, now=now)
    options = replace(params.options, dry_run=True, explain=True)
    out = Explanation()
    sources = runbook.dbt_sources(settings.dbt_project_dir)
    changed_tables = []
    for cfg in chosen:
        outcome = refresh_table(settings, clients, cfg, uuid4(), options)
        out.tables.append(outcome)
        changed = read_slices(outcome)
        if (
            cfg.mode is Mode.LIVE
            and cfg.table_name in sources
            and any(s["change"] != "unchanged" for s in outcome.plan)
        ):
            changed_tables.append(cfg.table_name)
            out.changed_slices += changed
    if changed_tables:
        out.dbt_select = " ".join(f"source:{DBT_SOURCE}.{t}+" for t in changed_tables)
        out.dbt_models = dbt_models(settings, out.dbt_select)
        out.periods = rebuild_periods(sorted(set(out.changed_slices)))
    return out


def render(ex: Explanation) -> list[str]:
    """The lines `refresh run --explain` prints."""
    lines = []
    for o in ex.tables:
        window = f" window {o.window.first}..{o.window.last} ({o.window.reason})" if o.window else ""
        lines.append(f"{o.table_name} [{o.mode}]{window}")
        if o.error:
            lines.append(f"  cannot explain: {o.error}")
        if o.status == "planned" and not o.plan:
            lines.append("  nothing to read")
        for s in o.plan:
            lines.append(f"  {s['slice']:<24} {s['change']:<9} {s['reason']}")
    if ex.dbt_select is None:
        lines.append("dbt: nothing to rebuild")
    else:
        lines.append(f"dbt build --select {ex.dbt_select}")
        lines.append(f"  models: {', '.join(ex.dbt_models) or '(none)'}")
        if ex.periods is None:
            slices = ", ".join(f"{a}..{b}" for a, b in sorted(set(ex.changed_slices)))
            lines.append(f"  periods: those holding the changed slices {slices or '(whole tables)'}")
        else:
            for kind, starts in ex.periods.items():
                lines.append(f"  {kind}: {', '.join(starts) or '-'}")
            lines.append("  (at most: the run rebuilds only the periods of the days its slices change)")
    return lines
