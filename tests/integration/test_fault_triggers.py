"""Triggers from the CLI, the schedule and the API arriving together.

Each round starts at once `refresh run --force` (a person), `refresh run --scheduled` (cron;
trigger `schedule`) and `POST /api/refresh/trigger` on a running `refresh api` (which starts the
flow in a background process). One refresh runs at a time (the runs' intervals never overlap)
and every trigger is accounted for: it ran (a run row with its trigger), or it was refused
with a reason: the CLI's one error line naming the running run, the API's 409 with the running
run id, or, for a trigger the API accepted whose process then found another refresh holding
the lock, the refusal recorded on the trigger (`GET /api/refresh/triggers/{id}`). Nothing is
queued, nothing is lost.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from flows.control import tokens
from tests.integration.api.support import api_process
from tests.integration.fault_support import FaultStack, fault_stack, runs_left_running

pytestmark = pytest.mark.faults

ROUNDS = 3


@pytest.fixture(scope="module")
def ft(stack: object) -> Iterator[FaultStack]:
    yield from fault_stack("ft_triggers")


@pytest.fixture(scope="module")
def api(ft: FaultStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with ft.pg() as conn:
        # Admin: every round forces a refresh of tables the previous round just refreshed, and
        # only an admin token's force passes the API's once-an-hour limit.
        token, _ = tokens.create(conn, ft.settings.control_schema, "fault-triggers", ["admin"])
    log_path = tmp_path_factory.mktemp("fault-api") / "api.log"
    # No Prefect API for the API process: its trigger starts the flow as a process of its own
    # (the deployment path has its own test, test_trigger_deployment.py).
    env = {k: v for k, v in ft.env.items() if k != "PREFECT_API_URL"}
    with api_process({**env, "REFRESH_API_ANONYMOUS_READ": "false"}, log_path) as url:
        yield url, token


def _runs(ft: FaultStack) -> list[dict[str, Any]]:
    with ft.pg() as conn:
        cur = conn.execute(
            "select run_id, trigger, status, started_at, finished_at from refresh_control.refresh_runs "
            "order by started_at"
        )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _together(ft: FaultStack, url: str, h: dict[str, str], api_delay_s: float) -> dict[str, Any]:
    """The three triggers started at one instant (the API's after `api_delay_s`)."""
    barrier = threading.Barrier(3)
    results: dict[str, Any] = {}

    def cli(name: str, *args: str) -> None:
        barrier.wait()
        results[name] = ft.run("run", "--no-stack", *args, timeout=900)

    def post() -> None:
        barrier.wait()
        time.sleep(api_delay_s)
        results["api"] = httpx.post(f"{url}/api/refresh/trigger", json={"force": True}, headers=h, timeout=60)

    threads = [
        threading.Thread(target=cli, args=("manual", "--force")),
        threading.Thread(target=cli, args=("schedule", "--scheduled")),
        threading.Thread(target=post),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return results


@pytest.mark.timeout(3600)
def test_triggers_from_cli_schedule_and_api_together_one_runs_none_lost(
    ft: FaultStack, api: tuple[str, str]
) -> None:
    url, token = api
    h = {"Authorization": f"Bearer {token}"}
    tally: dict[str, int] = {"ran": 0, "refused": 0}
    for round_ in range(ROUNDS):
        before = {r["run_id"] for r in _runs(ft)}
        # A different moment each round: the API with the CLIs, or a little after them.
        results = _together(ft, url, h, api_delay_s=[0.0, 1.5, 4.0][round_ % 3])

        accounted: dict[str, str] = {}
        for name in ("manual", "schedule"):
            done = results[name]
            if done.returncode in (0, 2):
                accounted[name] = "ran"
            else:
                errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
                assert done.returncode == 1 and len(errors) == 1, (name, done.stderr[-2000:])
                assert "another refresh is running (" in errors[0], errors[0]
                accounted[name] = "refused: " + errors[0]
        resp = results["api"]
        if resp.status_code == 409:
            body = resp.json()
            assert "a refresh is running" in body["detail"], body
            # The run id when its row exists; a CLI run holds the lock for a while before it
            # writes the row (Prefect starting): then its trigger and pid. Never anonymous.
            assert body.get("run_id") or body.get("trigger_id") or body.get("pid"), body
            accounted["api"] = f"refused: 409 {body['detail']}"
        else:
            assert resp.status_code == 202, resp.text
            trigger_id = resp.json()["trigger_id"]
            # Its process started at once: within two minutes its run has begun, or it was refused
            # (the CLIs have ended by now); then its run ends.
            begun_by = time.monotonic() + 120
            while True:
                t = httpx.get(f"{url}/api/refresh/triggers/{trigger_id}", headers=h, timeout=30).json()
                if t.get("refused"):
                    accounted["api"] = "refused: " + t["refused"]
                    break
                if t["run_status"] not in (None, "running"):
                    accounted["api"] = "ran"
                    break
                if t["run_id"] is None:
                    assert time.monotonic() < begun_by, (
                        f"trigger {trigger_id} neither ran nor was refused: {t}"
                    )
                time.sleep(0.5)
        print(f"round {round_}:", accounted)

        runs = [r for r in _runs(ft) if r["run_id"] not in before]
        ran = {name for name, a in accounted.items() if a == "ran"}
        # Every trigger that ran has its run (by its trigger label), and no run came from nowhere.
        label = {"manual": "cli", "schedule": "schedule", "api": "api"}  # refresh_runs.trigger
        assert sorted(r["trigger"] for r in runs) == sorted(label[n] for n in ran), (runs, accounted)
        assert ran, accounted
        # One refresh at a time: the runs' intervals never overlap.
        spans = sorted((r["started_at"], r["finished_at"]) for r in runs)
        assert all(a[1] is not None and a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
        assert runs_left_running(ft) == []
        for a in accounted.values():
            tally["ran" if a == "ran" else "refused"] += 1
    print("triggers:", tally)


def test_refusal_of_an_api_started_process_is_recorded_on_its_trigger(
    ft: FaultStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's side alone: the process the API started (this one, by pid and host) finds
    the lock taken and records why on its trigger; another process's trigger is left alone."""
    import os
    import socket
    import uuid

    from flows.control import triggers
    from flows.orchestration import detached_run

    schema = ft.settings.control_schema
    mine, other = uuid.uuid4(), uuid.uuid4()
    with ft.pg() as conn:
        for tid, pid in ((other, os.getpid() + 1), (mine, os.getpid())):
            triggers.record(
                conn,
                schema,
                trigger_id=tid,
                idempotency_key=None,
                request_sha256="x",
                params={"force": True},
                via="process",
                flow_run_id=None,
                pid=pid,
                hostname=socket.gethostname(),
                token_id=None,
            )
    monkeypatch.setenv("REFRESH_PG_DSN", ft.env["REFRESH_PG_DSN"])
    detached_run.record_refusal("another refresh is running (run 1234): this run did nothing")
    with ft.pg() as conn:
        got, untouched = triggers.get(conn, schema, mine), triggers.get(conn, schema, other)
    assert got is not None and got.refused == "another refresh is running (run 1234): this run did nothing"
    assert got.run_id is None
    assert untouched is not None and untouched.refused is None
