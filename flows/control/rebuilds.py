"""Slices whose dbt rebuild is still owed: applied by an earlier run whose dbt build did not
succeed (it failed, or the run died before it), and not covered by a successful build since.

A daily run rebuilds only the periods of the slices it applied (flows.engine.periods); a slice
applied by a run whose dbt failed would otherwise never be rebuilt once the next run finds it
unchanged and skips it. The run adds these slices to its own (TableOutcome.changed_slices).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control import checkpoints
from flows.core.db import qualified


def slices_awaiting_dbt(
    conn: psycopg.Connection, schema: str, table: str, run_id: UUID, within_days: int
) -> list[tuple[date, date]]:
    """Dated slices of `table` applied in the last `within_days` days by other runs than
    `run_id` with no successful dbt build of a refresh run after them that selected the table
    (the flow's selector `source:<dbt source>.<table>+`, see
    flows.orchestration.dbt_selection.dbt_build_args) or was a --full-refresh."""
    rows = _awaiting(conn, schema, table, run_id, within_days, whole_table=False)
    return [
        (start.astimezone(UTC).date(), end.astimezone(UTC).date()) for start, end in rows if start and end
    ]


def whole_table_awaiting_dbt(
    conn: psycopg.Connection, schema: str, table: str, run_id: UUID, within_days: int
) -> bool:
    """Whether a whole-table load of `table` (full_replace) in the last `within_days` days by
    another run than `run_id` still waits for a successful dbt build, as above. A run that
    finds the table unchanged rebuilds its models only then."""
    return bool(_awaiting(conn, schema, table, run_id, within_days, whole_table=True))


def _awaiting(
    conn: psycopg.Connection, schema: str, table: str, run_id: UUID, within_days: int, *, whole_table: bool
) -> list[tuple[datetime | None, datetime | None]]:
    # `_` is a LIKE wildcard; `.` before and `+` after the name keep other tables' selectors out.
    selector = "%source:%." + table.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "+%"
    dated = checkpoints.dated(sql.Identifier("s", "slice_start"))
    kind = sql.SQL("not {}").format(dated) if whole_table else dated
    rows = conn.execute(
        sql.SQL(
            "select distinct {start}, {end} from {sr} s "
            "where s.table_name = %s and s.status = 'success' and s.run_id <> %s "
            "and {kind} "
            "and s.finished_at > now() - make_interval(days => %s) "
            "and not exists (select 1 from {inv} i join {runs} r on r.dbt_invocation_id = i.invocation_id "
            "  where i.success and i.started_at >= s.finished_at "
            "  and (i.args @> '[\"--full-refresh\"]'::jsonb or i.args::text like %s)) "
            "order by 1"
        ).format(
            start=checkpoints.bound(sql.Identifier("s", "slice_start")),
            end=checkpoints.bound(sql.Identifier("s", "slice_end")),
            sr=qualified(schema, "slice_refreshes"),
            inv=qualified(schema, "dbt_invocations"),
            runs=qualified(schema, "refresh_runs"),
            kind=kind,
        ),
        (table, run_id, within_days, selector),
    ).fetchall()
    return [(start, end) for start, end in rows]
