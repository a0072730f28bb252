"""Cutover and rollback of a table's mode, audited in `mode_changes` (who, when, why).

Cutover moves one step: dry_run -> shadow -> live. The step to live changes what readers see,
so it needs the table's latest validation (`dq_results`, check `source_match`) to have passed,
to be newer than the table's last mode change, and to have checked the shadow schema the table
writes to now; `force` skips that and is recorded with its reason. dry_run -> shadow writes
only the shadow schema, and there is nothing loaded yet to validate, so it needs no validation.

Rollback undoes the newest cutover not yet undone: the mode goes back to what it was, and no
data is touched (a live table rolled back to shadow keeps its raw rows). The mode change, its
audit row and the event commit in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from flows.control import dq, registry
from flows.core.db import qualified
from flows.core.errors import ConfigError
from flows.core.table_config import Mode

NEXT_MODE = {Mode.DRY_RUN: Mode.SHADOW, Mode.SHADOW: Mode.LIVE}
NEEDS_VALIDATION = {Mode.LIVE}


class CutoverRefused(ConfigError):
    """The cutover would put unvalidated data in front of readers."""


@dataclass(frozen=True)
class ModeChange:
    id: int
    table_name: str
    action: str
    from_mode: str
    to_mode: str
    forced: bool
    changed_by: str
    reason: str
    changed_at: datetime


def _last_change_at(conn: psycopg.Connection, schema: str, table: str) -> datetime | None:
    row = conn.execute(
        sql.SQL("select max(changed_at) from {} where table_name = %s").format(
            qualified(schema, "mode_changes")
        ),
        (table,),
    ).fetchone()
    return row[0] if row else None


def _insert(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    action: str,
    from_mode: Mode,
    to_mode: Mode,
    who: str,
    reason: str,
    forced: bool = False,
    validation: dq.LatestValidation | None = None,
    undoes: int | None = None,
) -> ModeChange:
    row = conn.execute(
        sql.SQL(
            "insert into {} (table_name, action, from_mode, to_mode, forced, validation_checked_at, "
            "validation_passed, undoes, changed_by, reason) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "returning id, changed_at"
        ).format(qualified(schema, "mode_changes")),
        (
            table,
            action,
            from_mode.value,
            to_mode.value,
            forced,
            validation.checked_at if validation else None,
            validation.passed if validation else None,
            undoes,
            who,
            reason,
        ),
    ).fetchone()
    assert row is not None
    change = ModeChange(row[0], table, action, from_mode.value, to_mode.value, forced, who, reason, row[1])
    dq.emit_event(
        conn,
        schema,
        f"table.{action}",
        table,
        {
            "from_mode": change.from_mode,
            "to_mode": change.to_mode,
            "forced": forced,
            "by": who,
            "reason": reason,
        },
    )
    return change


def cutover(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    validated_schema: str,
    who: str,
    reason: str = "",
    force: bool = False,
) -> ModeChange:
    """Move `table` one step towards live. `validated_schema`: where it writes in its current
    mode (the shadow schema when it is in shadow), which its latest validation must have checked."""
    if force and not reason.strip():
        raise ConfigError("--force needs a --reason: say why the validation is overridden")
    with conn.transaction():
        cfg = registry.get(conn, schema, table)
        target = NEXT_MODE.get(cfg.mode)
        if target is None:
            raise ConfigError(
                f"{table} is {cfg.mode.value}: cutover moves dry_run -> shadow -> live"
                + (
                    " (it is live already)"
                    if cfg.mode is Mode.LIVE
                    else "; set its mode with `refresh config set`"
                )
            )
        latest = dq.latest(conn, schema, table, "source_match")
        if target in NEEDS_VALIDATION and not force:
            since = _last_change_at(conn, schema, table)
            problem = None
            if latest is None:
                problem = "it has never been validated"
            elif since is not None and latest.checked_at <= since:
                problem = (
                    f"its latest validation ({latest.checked_at:%Y-%m-%d %H:%M}) predates its last "
                    "mode change"
                )
            elif latest.schema != validated_schema:
                problem = f"its latest validation checked {latest.schema}, not {validated_schema}"
            elif not latest.passed:
                problem = f"its latest validation failed ({latest.failed} of {latest.periods} periods differ)"
            if problem:
                raise CutoverRefused(
                    f"refusing to cut {table} over to {target.value}: {problem}. Run `refresh validate-data "
                    f"--tables {table}` after a shadow refresh, or override with --force --reason '...'"
                )
        registry.update(conn, schema, table, {"mode": target.value}, who=who)
        return _insert(
            conn,
            schema,
            table,
            "cutover",
            cfg.mode,
            target,
            who,
            reason,
            force,
            latest if target in NEEDS_VALIDATION else None,
        )


def rollback(conn: psycopg.Connection, schema: str, table: str, who: str, reason: str = "") -> ModeChange:
    """Undo the newest cutover of `table` that is not undone yet; no data is touched."""
    with conn.transaction():
        cfg = registry.get(conn, schema, table)
        row = conn.execute(
            sql.SQL(
                "select id, from_mode, to_mode from {t} c where table_name = %s and action = 'cutover' "
                "and not exists (select 1 from {t} r where r.undoes = c.id) "
                "order by id desc limit 1 for update"
            ).format(t=qualified(schema, "mode_changes")),
            (table,),
        ).fetchone()
        if row is None:
            raise ConfigError(f"{table} has no cutover to roll back (it is {cfg.mode.value})")
        change_id, from_mode, to_mode = row
        if cfg.mode.value != to_mode:
            raise ConfigError(
                f"{table} is {cfg.mode.value}, but its last cutover set {to_mode}: the mode was changed "
                "by other means since; set it with `refresh config set` instead"
            )
        registry.update(conn, schema, table, {"mode": from_mode}, who=who)
        return _insert(
            conn, schema, table, "rollback", cfg.mode, Mode(from_mode), who, reason, undoes=change_id
        )


def history(
    conn: psycopg.Connection, schema: str, table: str | None = None, limit: int = 50
) -> list[ModeChange]:
    where = sql.SQL("where table_name = %s") if table else sql.SQL("")
    rows = conn.execute(
        sql.SQL(
            "select id, table_name, action, from_mode, to_mode, forced, changed_by, reason, changed_at "
            "from {t} {where} order by id desc limit %s"
        ).format(t=qualified(schema, "mode_changes"), where=where),
        ([table] if table else []) + [limit],
    ).fetchall()
    return [ModeChange(*r) for r in rows]
