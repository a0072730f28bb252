"""Cutover and rollback against real Postgres, in their own control schema."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import psycopg
import pytest
from typer.testing import CliRunner

from flows.control import registry, rollout
from flows.control.fingerprints import Fingerprint
from flows.core.db import migrate
from flows.core.errors import ConfigError
from flows.core.settings import Settings, get_settings
from flows.core.table_config import Mode, TableConfig
from flows.engine.validation import source_match
from flows.engine.validation.source_match import PeriodResult

CONTROL = "ro_control"
TABLE = "ro_sqp"


@pytest.fixture
def settings(stack: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("REFRESH_CONTROL_SCHEMA", CONTROL)
    s = get_settings()
    migrate(s)
    with psycopg.connect(s.dsn(), autocommit=True) as conn:
        conn.execute(f"truncate {CONTROL}.mode_changes, {CONTROL}.dq_results, {CONTROL}.events cascade")
        conn.execute(f"delete from {CONTROL}.refresh_config")
        registry.sync_from_file(
            conn,
            CONTROL,
            [TableConfig(table_name=TABLE, source_table="sqp", cursor_column="Date", mode=Mode.DRY_RUN)],
        )
    yield s


def _validate(conn: psycopg.Connection, passed: bool, schema: str = "raw_shadow") -> None:
    """Record a validation the way `validate` does (one transaction, event when it differs)."""
    other = Fingerprint(10, 1) if passed else Fingerprint(9, 1)
    results = [
        PeriodResult(
            TABLE, date(2026, 11, 2), date(2026, 11, 9), Fingerprint(10, 1), Fingerprint(10, 1), schema, []
        ),
        PeriodResult(TABLE, date(2026, 11, 9), date(2026, 11, 16), Fingerprint(10, 1), other, schema, []),
    ]
    source_match.record_results(conn, CONTROL, registry.get(conn, CONTROL, TABLE), results)


def _mode(conn: psycopg.Connection) -> Mode:
    return registry.get(conn, CONTROL, TABLE).mode


def test_cutover_refused_while_validation_fails_and_rollback_restores(settings: Settings) -> None:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        first = rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana", reason="start shadow")
        assert (first.from_mode, first.to_mode) == ("dry_run", "shadow")

        with pytest.raises(rollout.CutoverRefused, match="never been validated"):
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana")
        _validate(conn, passed=False)
        with pytest.raises(
            rollout.CutoverRefused, match=r"latest validation failed \(1 of 2 periods differ\)"
        ):
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana")
        _validate(conn, passed=True, schema="raw")
        with pytest.raises(rollout.CutoverRefused, match="checked raw, not raw_shadow"):
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana")
        assert _mode(conn) is Mode.SHADOW

        _validate(conn, passed=True)
        live = rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana", reason="validated")
        assert (live.from_mode, live.to_mode, live.forced) == ("shadow", "live", False)
        assert _mode(conn) is Mode.LIVE
        with pytest.raises(ConfigError, match="live already"):
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana")

        back = rollout.rollback(conn, CONTROL, TABLE, who="bob", reason="numbers look off")
        assert (back.from_mode, back.to_mode) == ("live", "shadow")
        assert _mode(conn) is Mode.SHADOW
        # A validation older than the last mode change does not count.
        with pytest.raises(rollout.CutoverRefused, match="predates its last mode change"):
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana")
        assert rollout.rollback(conn, CONTROL, TABLE, who="bob").to_mode == "dry_run"
        with pytest.raises(ConfigError, match="no cutover to roll back"):
            rollout.rollback(conn, CONTROL, TABLE, who="bob")

        audit = conn.execute(
            f"select action, from_mode, to_mode, changed_by, reason, validation_passed, undoes is not null "
            f"from {CONTROL}.mode_changes order by id"
        ).fetchall()
        events = conn.execute(f"select event from {CONTROL}.events order by id").fetchall()
    assert audit == [
        ("cutover", "dry_run", "shadow", "ana", "start shadow", None, False),
        ("cutover", "shadow", "live", "ana", "validated", True, False),
        ("rollback", "live", "shadow", "bob", "numbers look off", None, True),
        ("rollback", "shadow", "dry_run", "bob", "", None, True),
    ]
    assert [e[0] for e in events] == [
        "table.cutover",
        "validation.failed",
        "table.cutover",
        "table.rollback",
        "table.rollback",
    ]


def test_forced_cutover_needs_a_reason_and_is_recorded(settings: Settings) -> None:
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana")
        _validate(conn, passed=False)
        with pytest.raises(ConfigError, match="--force needs a --reason"):
            rollout.cutover(conn, CONTROL, TABLE, "raw_shadow", who="ana", force=True)
        assert _mode(conn) is Mode.SHADOW
        forced = rollout.cutover(
            conn, CONTROL, TABLE, "raw_shadow", who="ana", reason="known gap", force=True
        )
        assert (forced.to_mode, forced.forced) == ("live", True)
        row = conn.execute(
            f"select forced, validation_passed, reason from {CONTROL}.mode_changes order by id desc limit 1"
        ).fetchone()
    assert row == (True, False, "known gap")


def test_cli_cutover_refusal_is_one_clear_line(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import app

    tables = settings.state_dir / "ro_tables.yml"
    tables.write_text(
        f"tables:\n  {TABLE}:\n    source_table: sqp\n    cursor_column: Date\n    mode: dry_run\n"
    )
    monkeypatch.setenv("REFRESH_TABLES_FILE", str(tables))
    runner = CliRunner()
    ok = runner.invoke(app, ["cutover", TABLE, "--by", "ana"])
    assert ok.exit_code == 0, ok.output
    assert "dry_run -> shadow" in ok.output
    refused = runner.invoke(app, ["cutover", TABLE])
    assert refused.exit_code == 1
    assert "refusing to cut ro_sqp over to live: it has never been validated" in refused.output
    back = runner.invoke(app, ["rollback", TABLE, "--reason", "test"])
    assert back.exit_code == 0 and "shadow -> dry_run" in back.output
