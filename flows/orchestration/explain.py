"""`refresh run --explain`: what a run would read and rebuild, and why, without writing.

Each planned table is planned and fingerprinted as the run would (flows.engine.table_refresh with
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

from flows.control import registry
from flows.control.statuses import TableStatus
from flows.core.db import connect
from flows.core.settings import Settings
from flows.core.table_config import Mode
from flows.engine.bigquery import BigQueryClients
from flows.engine.change_detection import Change
from flows.engine.periods import days_periods
from flows.engine.table_refresh import RefreshOptions, TableOutcome, refresh_table
from flows.engine.transform import dbt_env, invoke_dbt, profiles_dir
from flows.orchestration import dbt_selection, run_params, run_plan

DBT_SOURCE = "sqp"


@dataclass
class Explanation:
    tables: list[TableOutcome] = field(default_factory=list)
    dbt_select: str | None = None  # the selection of the run's `dbt build` (None: nothing)
    dbt_models: list[str] = field(default_factory=list)
    # The periods dbt rebuilds (flows.engine.periods); None when no table was explained.
    periods: dict[str, list[str]] | None = None
    # What decides the periods: "days" (those the loads would change, refresh_days), "slices"
    # (a slice without known days: each of its days), "from <date>" (a requested range:
    # refresh_start_date), "lookback" (no var: only tables replaced whole changed) or
    # "everything" (--full-refresh).
    periods_from: str | None = None
    # The vars the run's `dbt build` would get that say what to rebuild (dbt_selection.rebuild_vars).
    dbt_vars: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tables": [
                {
                    "table": o.table_name,
                    "status": o.status,
                    "window": None if o.window is None else f"{o.window.first}..{o.window.last}",
                    "slices": o.plan,
                    "owed": [f"{a}..{b}" for a, b in owed_slices(o)],
                    "error": o.error,
                }
                for o in self.tables
            ],
            "dbt_select": self.dbt_select,
            "dbt_models": self.dbt_models,
            "periods": self.periods,
            "periods_from": self.periods_from,
            "dbt_vars": self.dbt_vars,
        }


def read_slices(outcome: TableOutcome) -> list[tuple[date, date]]:
    """The (start, end) of each slice the table's run would read (not the whole-table ones)."""
    out = []
    for s in outcome.plan:
        if s["change"] != Change.UNCHANGED and s["slice"] != "full":
            first, end = s["slice"].split("..")
            out.append((date.fromisoformat(first), date.fromisoformat(end)))
    return out


def owed_slices(outcome: TableOutcome) -> list[tuple[date, date]]:
    """Slices an earlier run applied whose dbt build is still owed: the run rebuilds them too."""
    read = set(read_slices(outcome))
    return [s for s in outcome.changed_slices if s not in read]


def rebuild_periods(
    changed: list[TableOutcome], options: RefreshOptions
) -> tuple[dict[str, list[str]], str, dict[str, Any]]:
    """The dbt periods the run would rebuild for the `changed` tables, what decides them (see
    Explanation.periods_from) and the run's vars, by the run's own rule
    (flows.orchestration.dbt_selection.rebuild_vars): the periods of the days its loads would change (the days
    holding rows in the raw table or in BigQuery of each slice it reads) and of every day of
    the slices owed or without per-day figures; with a requested range, everything from its
    start; with --full-refresh, everything."""
    if options.full_refresh:
        return {}, "everything", {}
    dbt_vars = dbt_selection.rebuild_vars(changed, options.explicit_range)
    if "refresh_start_date" in dbt_vars:
        return {}, f"from {dbt_vars['refresh_start_date']}", dbt_vars
    if not dbt_vars:
        return {}, "lookback", dbt_vars
    days = [date.fromisoformat(d) for d in dbt_vars.get("refresh_days", [])]
    exact = all(s in o.slice_days for o in changed for s in o.changed_slices)
    return days_periods(days).to_dict(), "days" if exact else "slices", dbt_vars


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
    settings: Settings, clients: BigQueryClients, params: run_params.RunParams, now: datetime
) -> Explanation:
    """Plan, fingerprint and decide every table the run would refresh; write nothing.

    The registry is read as it stands: neither migrated nor synced from the file (a run does
    both first), and new source tables are not registered.
    """
    with connect(settings, autocommit=True) as conn:
        configs = registry.load_all(conn, settings.control_schema)
    chosen = run_plan.select_tables(configs, params.tables, force=params.force, now=now)
    options = replace(params.options, dry_run=True, explain=True)
    out = Explanation()
    sources = dbt_selection.dbt_sources(settings.dbt_project_dir)
    changed = []
    for cfg in chosen:
        outcome = refresh_table(settings, clients, cfg, uuid4(), options)
        out.tables.append(outcome)
        # As the run decides (dbt_selection.dbt_build_args): slices to read or owed, or a whole table
        # to read or owed.
        if (
            outcome.status == TableStatus.PLANNED
            and cfg.mode is Mode.LIVE
            and cfg.table_name in sources
            and (outcome.changed_slices or outcome.replaced_whole)
        ):
            changed.append(outcome)
    if changed:
        out.dbt_select = " ".join(f"source:{DBT_SOURCE}.{o.table_name}+" for o in changed)
        out.dbt_models = dbt_models(settings, out.dbt_select)
        out.periods, out.periods_from, out.dbt_vars = rebuild_periods(changed, options)
    return out


def day_ranges(days: list[date]) -> str:
    """Sorted days as text, runs of consecutive days as `first..last`."""
    runs: list[list[date]] = []
    for d in sorted(set(days)):
        if runs and (d - runs[-1][-1]).days == 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def render(ex: Explanation) -> list[str]:
    """The lines `refresh run --explain` prints."""
    lines = []
    for o in ex.tables:
        window = f" window {o.window.first}..{o.window.last} ({o.window.reason})" if o.window else ""
        lines.append(f"{o.table_name} [{o.mode}]{window}")
        if o.error:
            lines.append(f"  cannot explain: {o.error}")
        if o.status == TableStatus.PLANNED and not o.plan:
            lines.append("  nothing to read")
        for s in o.plan:
            lines.append(f"  {s['slice']:<24} {s['change']:<9} {s['reason']}")
        for a, b in owed_slices(o):
            lines.append(
                f"  {f'{a}..{b}':<24} {'owed':<9} applied by an earlier run whose dbt build did not succeed"
            )
    if ex.dbt_select is None:
        lines.append("dbt: nothing to rebuild")
    else:
        lines.append(f"dbt build --select {ex.dbt_select}")
        lines.append(f"  models: {', '.join(ex.dbt_models) or '(none)'}")
        if ex.periods_from == "everything":
            lines.append("  periods: every period (--full-refresh)")
        elif ex.periods_from is not None and ex.periods_from.startswith("from "):
            lines.append(
                f"  periods: every period from the one holding {ex.periods_from[5:]} (a requested range)"
            )
        elif ex.periods_from == "lookback":
            lines.append(
                "  periods: each incremental model's lookback from its newest period "
                "(only tables replaced whole changed: no var)"
            )
        elif not ex.periods or not any(ex.periods.values()):
            lines.append("  periods: none (the slices to read hold no rows, in Postgres or in BigQuery)")
        else:
            days = [date.fromisoformat(d) for d in (ex.dbt_vars or {}).get("refresh_days", [])]
            lines.append(f"  days: {day_ranges(days) or '-'}")
            for kind, starts in ex.periods.items():
                lines.append(f"  {kind}: {', '.join(starts) or '-'}")
            if ex.periods_from == "days":
                lines.append(
                    "  (the days holding rows in the raw table or in BigQuery of each slice to read: "
                    "the days its load changes, if the source does not change before the run)"
                )
            else:
                lines.append(
                    "  (an owed slice, or one whose cursor is not a date: every day of it, as in the run)"
                )
    return lines
