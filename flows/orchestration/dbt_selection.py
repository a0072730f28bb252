"""What dbt builds after the loads: the nodes downstream of what the run changed, and the
periods its incremental models rebuild (the build step's arguments)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from flows.control.tables import TableOutcome
from flows.engine.periods import changed_days

DBT_SOURCE = "sqp"
CONTROL_SOURCE = "refresh_control"


def dbt_sources(project_dir: Path) -> set[str]:
    """Tables of the dbt source `sqp` (the raw tables dbt models read), from the model YAML."""
    names: set[str] = set()
    for path in sorted((project_dir / "models").rglob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for source in doc.get("sources") or []:
            if source.get("name") == DBT_SOURCE:
                names.update(t["name"] for t in source.get("tables") or [])
    return names


def dbt_build_args(
    outcomes: list[TableOutcome], full_refresh: bool, sources: set[str], explicit_range: bool = False
) -> list[str] | None:
    """`dbt build` of what is downstream of the live dbt sources this run changed (None: nothing).

    A table changed when it applied a slice or owes one a rebuild (TableOutcome.changed_slices),
    or was replaced whole, now or by a run whose dbt build did not succeed
    (TableOutcome.replaced_whole); a table found unchanged changes nothing. Tables without a
    dbt source (registered later, not modelled yet) change no model. The incremental models
    rebuild:
    - a daily run: the periods of the changed days only (var refresh_days, flows.engine.periods);
    - a requested date range (backfill): everything from its start (var refresh_start_date);
    - --full-refresh: everything.
    Only a full_replace table changed: no var, the models' lookback from their watermark. The raw
    schema the run loaded into is added to the vars by flows.engine.transform.run_dbt.
    """
    changed = [
        o
        for o in outcomes
        if o.changed_live_data and o.table_name in sources and (o.changed_slices or o.replaced_whole)
    ]
    if not changed:
        return None
    # The monitoring views over the control schema (models/monitoring) are rebuilt too: views,
    # so this costs little, and a new column of theirs is live after the next refresh.
    select = " ".join(
        [*(f"source:{DBT_SOURCE}.{o.table_name}+" for o in changed), f"source:{CONTROL_SOURCE}+"]
    )
    dbt_vars = {} if full_refresh else rebuild_vars(changed, explicit_range)
    args = ["build", "--select", select, "--vars", json.dumps(dbt_vars)]
    if full_refresh:
        args.append("--full-refresh")
    return args


def rebuild_vars(changed: list[TableOutcome], explicit_range: bool) -> dict[str, Any]:
    """The dbt vars saying which periods the incremental models rebuild (see dbt_build_args)."""
    if explicit_range:
        starts = [o.window.first for o in changed if o.window is not None]
        return {"refresh_start_date": min(starts).isoformat()} if starts else {}
    slices = [s for o in changed for s in o.changed_slices]
    if not slices:
        return {}
    days: set[date] = set()
    for o in changed:
        days.update(changed_days(o.changed_slices, o.slice_days))
    return {"refresh_days": [d.isoformat() for d in sorted(days)]}
