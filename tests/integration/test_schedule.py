"""The schedule's cadence: which tables each run selects, and the due times it leaves behind.

The real selection (flows.orchestration.run_plan.prepare + select_tables / plan_tables) and the real due-time
update (flows.orchestration.run_plan.advance_due_times) run against the session's Postgres, each test in its
own control schema. Time is simulated: every run's anchor is passed in, nothing sleeps. A
simulated run succeeds for every table it selects (what it loads is tested elsewhere).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from flows.core.errors import ConfigError
from flows.core.settings import Settings, get_settings
from flows.demo.sample_data import SampleSpec, generate
from flows.engine.bigquery import make_clients
from flows.engine.table_refresh import TableOutcome
from flows.orchestration import run_params, run_plan

TABLES_FILE = """
tables:
  daily_a: {source_table: a, write_strategy: full_replace, priority: 90}
  daily_b: {source_table: b, write_strategy: full_replace, refresh_frequency_hours: 24}
  half_day: {source_table: c, write_strategy: full_replace, refresh_frequency_hours: 12}
  six_hourly: {source_table: d, write_strategy: full_replace, refresh_frequency_hours: 6}
"""
FREQUENCY_H = {"daily_a": 24, "daily_b": 24, "half_day": 12, "six_hourly": 6}
START = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def _settings(tmp_path: Path, schema: str, **overrides: object) -> Settings:
    tables_file = tmp_path / "tables.yml"
    tables_file.write_text(TABLES_FILE)
    return get_settings(control_schema=schema, tables_file=tables_file, **overrides)


@dataclass
class Simulation:
    settings: Settings
    conn: psycopg.Connection
    manual_runs: int = 0

    def run(
        self, anchor: datetime, *, scheduled: bool, requested: list[str] | None = None, force: bool = False
    ) -> set[str]:
        """One run as the flow does it: registry synced, tables selected at the anchor, each
        chosen table refreshed successfully, due times advanced."""
        configs = run_plan.prepare(self.settings)
        chosen = run_plan.select_tables(configs, requested, force=force, now=anchor, scheduled=scheduled)
        outcomes = [TableOutcome(c.table_name, "success", c.mode.value) for c in chosen]
        run_plan.advance_due_times(self.conn, self.settings, chosen, outcomes, anchor, scheduled=scheduled)
        return {c.table_name for c in chosen}

    def manual(self, rng: random.Random, start: datetime) -> None:
        kind = rng.choice(["due", "named", "force"])
        names = sorted(FREQUENCY_H)
        requested = rng.sample(names, rng.randint(1, len(names))) if kind == "named" else None
        self.run(start, scheduled=False, requested=requested, force=kind == "force")
        self.manual_runs += 1


@pytest.mark.parametrize(
    ("schedule_hours", "days", "seed"),
    [([0], 60, 1), ([0, 6, 12, 18], 21, 2)],
    ids=["daily-schedule", "six-hourly-schedule"],
)
def test_every_scheduled_run_refreshes_each_table_at_its_cadence(
    stack: object, tmp_path: Path, schedule_hours: list[int], days: int, seed: int
) -> None:
    """Runs of minutes to hours, anchors off by up to 10 minutes either way (a cron start, or
    a scheduler running late), and manual runs (due tables, named tables, forced) between the
    scheduled ones: each scheduled run refreshes exactly the tables whose cadence falls on it."""
    rng = random.Random(seed)
    settings = _settings(tmp_path, f"sched_{seed}")
    ticks = [START + timedelta(days=d, hours=h) for d in range(days) for h in schedule_hours]
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        sim = Simulation(settings, conn)
        missed: list[str] = []
        for i, tick in enumerate(ticks):
            # Prefect anchors a deployment run on its cron tick; a cron-started one on its start.
            anchor = tick if rng.random() < 0.5 else tick + timedelta(minutes=rng.uniform(-10, 10))
            refreshed = sim.run(anchor, scheduled=True)
            hours = (tick - START) / timedelta(hours=1)
            expected = {t for t, f in FREQUENCY_H.items() if hours % f == 0}
            if refreshed != expected:
                missed.append(
                    f"{tick:%m-%d %H:%M} refreshed {sorted(refreshed)}, expected {sorted(expected)}"
                )
            # The run takes minutes to hours; manual runs may follow before the next tick.
            gap = (ticks[i + 1] if i + 1 < len(ticks) else tick + timedelta(hours=6)) - tick
            end = anchor + rng.uniform(0.01, 0.8) * gap
            last_start = tick + gap - timedelta(minutes=3)
            for _ in range(rng.choice([0, 0, 1, 2])):
                if end >= last_start:
                    break
                start = end + (last_start - end) * rng.random()
                sim.manual(rng, start)
                end = start + timedelta(minutes=rng.uniform(1, 20))
    assert not missed, "\n".join(missed)
    assert sim.manual_runs > len(ticks) // 3


def test_a_manual_run_after_a_missed_schedule_keeps_the_next_scheduled_refresh(
    stack: object, tmp_path: Path
) -> None:
    """The 02:00 refresh failed (the table stays due); fixed by hand at 14:00; the next 02:00
    run refreshes it again, and a manual run never moves a due time later."""
    settings = _settings(tmp_path, "sched_missed")
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        sim = Simulation(settings, conn)
        assert sim.run(START, scheduled=True) == set(FREQUENCY_H)
        day2 = START + timedelta(days=1)
        # the 02:00 run of day 2 failed for every table: nothing advanced
        assert sim.run(day2 + timedelta(hours=12), scheduled=False, requested=["daily_a"]) == {"daily_a"}
        assert sim.run(day2 + timedelta(days=1), scheduled=True) >= {"daily_a", "daily_b"}
        # a forced manual run an hour after the schedule leaves tomorrow's 02:00 as it is
        sim.run(day2 + timedelta(days=1, hours=1), scheduled=False, force=True)
        due = dict(
            conn.execute("select table_name, next_refresh_at from sched_missed.refresh_config").fetchall()
        )
        assert due["daily_a"] == day2 + timedelta(days=2)
        assert due["six_hourly"] == day2 + timedelta(days=1, hours=6)


def test_a_fresh_install_refreshes_every_registered_table_on_its_first_run(
    stack: object, tmp_path: Path
) -> None:
    """`refresh generate` then `refresh run`: the clock the run reads before it registers the
    tables is earlier than their registry rows, and every table is still due."""
    settings = _settings(tmp_path, "fresh_control", bq_dataset="fresh")
    clients = make_clients(settings)
    try:
        generate(clients, SampleSpec(sqp_rows=50, weeks=2, asins=5, daily_rows=30))
        now = datetime.now(UTC)
        params = run_params.validate_params(trigger="cli")
        chosen = run_plan.plan_tables(settings, clients, params, now=now)
    finally:
        clients.close()
    file_tables = set(FREQUENCY_H)
    assert file_tables <= {c.table_name for c in chosen}
    # the source tables nobody registered are registered (dry_run) and planned too
    assert {"search_query_performance", "products", "daily_search_terms"} <= {c.table_name for c in chosen}


def test_manual_runs_on_a_fresh_install_leave_each_table_due_at_its_next_scheduled_time(
    stack: object, tmp_path: Path
) -> None:
    """`make run` twice in the afternoon: every table is next due at a time still ahead, on the
    02:00 schedule (never the first run's time, in the past, beside a later last success), and
    the 02:00 run refreshes exactly the tables whose cadence falls on it."""
    settings = _settings(tmp_path, "sched_fresh")
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        sim = Simulation(settings, conn)
        first = START + timedelta(hours=12, minutes=3)
        assert sim.run(first, scheduled=False) == set(FREQUENCY_H)
        second = first + timedelta(minutes=1)
        assert sim.run(second, scheduled=False, force=True) == set(FREQUENCY_H)
        due = dict(
            conn.execute("select table_name, next_refresh_at from sched_fresh.refresh_config").fetchall()
        )
        assert all(when > second for when in due.values()), due
        assert due == {
            "daily_a": START + timedelta(days=1),
            "daily_b": START + timedelta(days=1),
            "half_day": START + timedelta(days=1),
            "six_hourly": START + timedelta(hours=18),
        }
        assert sim.run(START + timedelta(days=1), scheduled=True) == set(FREQUENCY_H)


def test_a_bad_schedule_fails_before_a_run_changes_anything(stack: object, tmp_path: Path) -> None:
    settings = _settings(tmp_path, "sched_bad", schedule_cron="at two")
    with pytest.raises(ConfigError, match="REFRESH_SCHEDULE_CRON"):
        run_plan.plan_tables(settings, None, run_params.validate_params(), now=START)  # type: ignore[arg-type]
