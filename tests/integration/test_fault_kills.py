"""SIGKILL of the `refresh run` process group at random moments of the whole run.

FAULT_TRIALS trials (default 25). Each trial starts `refresh run --no-stack --force` (the CLI
and everything it started, in its own process group), waits until the run reaches the trial's
target phase (taken in turn: extract, dbt, audit, dispatch, start) and kills the group with
SIGKILL after a random part of that phase. Where the kill landed is read afterwards from what
the dead process had committed (`phase_of`). Then a normal `refresh run` must complete, leave
Postgres equal to the source (flows.engine.validation per period, no duplicate keys) and mark the
killed run `abandoned`; no run stays `running`.

A webhook endpoint (tests/webhook_receiver.py, answering after 0.3 s) makes every run dispatch
events after its end; the receiver sees every event at least once by the end.

Memory of the emulator: a killed run leaves its Storage read sessions open; the session's
emulator bounds them (SQP_EMULATOR_SESSION_CAP_MB, flows.demo.local_stack) and the test checks its
RSS stays under a bound across the trials.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from flows.notify import endpoints
from tests.integration.fault_support import (
    FaultStack,
    assert_exact,
    fault_stack,
    runs_left_running,
    wait_for_sessions_to_end,
)
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.faults

TRIALS = int(os.environ.get("FAULT_TRIALS", "25"))
PHASES = ["start", "extract", "dbt", "audit", "dispatch"]
ORDER = [*PHASES, "after"]
# The trials' target phases in turn: a short CI run (FAULT_TRIALS=4) covers the run's work.
TARGETS = ["extract", "dbt", "audit", "dispatch", "start"]
# Emulator RSS allowed across the trials: its session cap (256 MB in tests) over its own size.
EMULATOR_RSS_LIMIT_MB = 1200


@pytest.fixture(scope="module")
def ft(stack: object) -> Iterator[FaultStack]:
    yield from fault_stack("ft_kills")


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def phase_of(ft: FaultStack, known_runs: set[Any], received: int) -> tuple[str, Any]:
    """Where a run is, from what it has committed: start (no run row yet), extract (a table not
    finished), dbt (validation and dbt: every table finished, dbt not recorded), audit (dbt
    recorded, the run's end not), dispatch (run ended, no webhook delivered yet), after (after
    the first delivery: the rest of the dispatch and the process's exit)."""
    with ft.pg() as conn:
        row = conn.execute(
            "select run_id, status from refresh_control.refresh_runs where not (run_id = any(%s)) "
            "order by started_at desc limit 1",
            (list(known_runs),),
        ).fetchone()
        if row is None:
            return "start", None
        run_id, status = row
        if status != "running":
            return ("dispatch" if received == 0 else "after"), run_id
        if conn.execute(
            "select count(*) from refresh_control.dbt_invocations where run_id = %s", (run_id,)
        ).fetchone() != (0,):
            return "audit", run_id
        tables = conn.execute(
            "select count(*) filter (where status <> 'running'), count(*) "
            "from refresh_control.table_refreshes where run_id = %s",
            (run_id,),
        ).fetchone()
        if tables is None or tables[1] < 3 or tables[0] < tables[1]:
            return "extract", run_id
        return "dbt", run_id


def _known_runs(ft: FaultStack) -> set[Any]:
    with ft.pg() as conn:
        return {r[0] for r in conn.execute("select run_id from refresh_control.refresh_runs")}


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to the process and everything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _normal_run(ft: FaultStack, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    done = ft.run("run", "--no-stack", "--force", env=env, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return time.monotonic() - t0


# A trial is a killed run plus a whole run after it: minutes each on a loaded 2-core machine.
@pytest.mark.timeout(600 + 600 * TRIALS)
def test_kill9_at_random_moments_of_the_run_then_a_normal_run_is_exact(
    ft: FaultStack, prefect_api: str, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFRESH_WEBHOOK_ALLOW_PRIVATE", "true")
    env = {"PREFECT_API_URL": prefect_api, "REFRESH_WEBHOOK_ALLOW_PRIVATE": "true"}
    rng = random.Random(int(os.environ.get("FAULT_SEED", "20261129")))
    emulator_pid = stack.emulator.process.pid
    rss = [_rss_mb(emulator_pid)]
    landed: Counter[str] = Counter()
    abandoned = 0
    t_all = time.monotonic()
    with Receiver() as rx:
        rx.delay_s = 0.3
        endpoints.add_endpoint(ft.settings, rx.url, None, "fault trials")
        # The first load, timed per phase: the kill delays below are drawn within them.
        spans: dict[str, float] = {}
        known = _known_runs(ft)
        t0 = time.monotonic()
        first = ft.cli(
            "run", "--no-stack", "--force", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        seen = "start"
        while first.poll() is None:
            phase, _ = phase_of(ft, known, len(rx.received))
            if phase != seen:
                spans[seen], seen, t0 = time.monotonic() - t0, phase, time.monotonic()
            time.sleep(0.02)
        spans[seen] = time.monotonic() - t0
        out, err = first.communicate()
        assert first.returncode == 0, (out[-3000:], err[-3000:])
        print("phases of a normal run (s):", {k: round(v, 2) for k, v in spans.items()})
        assert_exact(ft)

        for trial in range(TRIALS):
            target = TARGETS[trial % len(TARGETS)]
            known = _known_runs(ft)
            received = len(rx.received)
            child = ft.cli(
                "run", "--no-stack", "--force", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            # A random moment inside the target phase: audit and dispatch last well under a
            # second, so at once; spans are the first load's, and later runs extract much less.
            share = {"audit": 0.0, "dispatch": 0.0, "extract": 0.15}.get(target, 0.4)
            within = rng.uniform(0, share * spans.get(target, 0.5))
            deadline = time.monotonic() + 300
            try:
                while child.poll() is None:
                    phase, _ = phase_of(ft, known, len(rx.received) - received)
                    if ORDER.index(phase) >= ORDER.index(target):
                        break
                    assert time.monotonic() < deadline, f"trial {trial}: the run never reached {target}"
                    time.sleep(0.005)
                time.sleep(within)
                if child.poll() is not None:
                    # It finished first: counted as a kill after the run's end.
                    landed["ended before the kill"] += 1
                    continue
            finally:
                _kill(child)
            assert child.returncode == -signal.SIGKILL
            phase, killed_run = phase_of(ft, known, len(rx.received) - received)
            landed[phase] += 1
            wait_for_sessions_to_end(ft)

            # A normal run afterwards: completes, data exact, the killed run abandoned.
            _normal_run(ft, env)
            assert runs_left_running(ft) == []
            if killed_run is not None and phase in ("extract", "dbt", "audit"):
                status = ft.scalar(
                    "select status from refresh_control.refresh_runs where run_id = %s", (killed_run,)
                )
                assert status == "abandoned", (trial, phase, status)
                abandoned += 1
            assert_exact(ft)
            rss.append(_rss_mb(emulator_pid))
            print(
                f"trial {trial}: target {target}, landed {phase}, emulator RSS {rss[-1]:.0f} MB", flush=True
            )

        # No event is lost: each was delivered, or waits for its next attempt (one a kill cut
        # short); none is given up. The next run's dispatch sends what a killed one left.
        dispatched = ft.run("webhooks", "dispatch", env=env, timeout=120)
        assert dispatched.returncode == 0, dispatched.stderr
        with ft.pg() as conn:
            lost = conn.execute(
                "select e.id, e.event, d.status from refresh_control.events e "
                "left join refresh_control.webhook_deliveries d on d.event_id = e.id "
                "where coalesce(d.status, 'none') not in ('succeeded', 'pending')"
            ).fetchall()
            waiting = conn.execute(
                "select count(*) from refresh_control.webhook_deliveries where status = 'pending'"
            ).fetchone()
        assert not lost, f"events not delivered: {lost}"
        print(f"webhook deliveries received: {len(rx.received)}, still waiting for a retry: {waiting}")

    print(
        f"kill trials: {TRIALS}, landed per phase: {dict(landed)}, killed runs marked abandoned: {abandoned}"
    )
    print(f"emulator RSS (MB) first/max/last: {rss[0]:.0f}/{max(rss):.0f}/{rss[-1]:.0f}")
    print(f"all trials took {time.monotonic() - t_all:.0f}s")
    assert max(rss) < EMULATOR_RSS_LIMIT_MB, rss
    assert sum(landed.values()) == TRIALS
