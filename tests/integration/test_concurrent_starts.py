"""Three `refresh run` started together on a state directory whose embedded stack is down:
the stack is started once, runs that overlap the one refreshing are refused in one line and
exit at once, nobody stops a part another command uses, and the stack is stopped afterwards
(no lease or marker left)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from flows.core.db import REFRESH_LOCK_KEY
from flows.core.settings import Settings
from flows.demo.local_stack import free_port

REFRESH = str(Path(sys.executable).parent / "refresh")


def own_stack_env(state_dir: Path) -> dict[str, str]:
    """The environment of commands on a stack of their own under `state_dir`, as on a user's
    machine: free ports and their own Prefect home. They report to the test session's Prefect
    server (a configured PREFECT_API_URL wins), so their stack is Postgres and the emulator; the
    stack's own Prefect server is tested in test_local_prefect.py and test_cli_first_run.py."""
    return {
        **os.environ,
        "REFRESH_STATE_DIR": str(state_dir),
        "REFRESH_LOCAL_PG_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
        "PREFECT_HOME": str(state_dir / "prefect"),
        "COLUMNS": "200",
    }


def test_three_runs_started_together_on_a_stack_that_is_down() -> None:
    # Not pytest's tmp_path: its base is mode 0700, out of reach of the `pgserver` user that
    # runs Postgres as root, and pytest resets that mode whenever another session starts.
    tmp_path = Path(tempfile.mkdtemp(prefix="sqp-concurrent-"))
    env = own_stack_env(tmp_path)

    def refresh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([REFRESH, *args], env=env, capture_output=True, text=True, timeout=900)

    assert refresh("stack", "up").returncode == 0
    sample = ["--sqp-rows", "300", "--weeks", "3", "--asins", "5", "--daily-rows", "100"]
    assert refresh("generate", *sample).returncode == 0
    assert refresh("stack", "down").returncode == 0

    t0 = time.monotonic()
    outs = [(tmp_path / f"run-{i}.out").open("w+") for i in range(3)]
    procs = [
        subprocess.Popen([REFRESH, "run", "--force"], env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        for out in outs
    ]
    # When each one printed its error line and when its process ended (seconds from the start).
    error_at: dict[int, float] = {}
    exited_at: dict[int, float] = {}
    stderr: dict[int, str] = {}

    def follow(i: int, p: subprocess.Popen[str]) -> None:
        assert p.stderr is not None
        lines = []
        for line in p.stderr:
            if line.startswith("error:"):
                error_at.setdefault(i, time.monotonic() - t0)
            lines.append(line)
        p.wait(timeout=900)
        exited_at[i] = time.monotonic() - t0
        stderr[i] = "".join(lines)

    threads = [threading.Thread(target=follow, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    stdout = [(out.seek(0), out.read())[1] for out in outs]
    results = [(p.returncode, stdout[i], stderr[i]) for i, p in enumerate(procs)]

    # Runs that overlap the winner are refused; one that reaches the lock after the winner
    # ended (a very slow machine) refreshes after it.
    winners = [r for r in results if r[0] == 0]
    refused = [i for i, r in enumerate(results) if r[0] != 0]
    assert winners and all("refresh success" in out for _rc, out, _err in winners), results
    for i in refused:
        rc, _out, err = results[i]
        lines = [
            line for line in err.strip().splitlines() if "Warning" not in line and "return Path" not in line
        ]
        assert rc == 1 and "another refresh is running" in err and "Traceback" not in err, err
        assert len(lines) <= 3 and lines[0].startswith("error:"), err
        # Refused before it started Prefect: its process ends with its message, not with the
        # winner (with Prefect started, tearing it down takes 8-26 s more).
        assert exited_at[i] - error_at[i] < 5, (error_at, exited_at)
        assert exited_at[i] < max(exited_at[w] for w, r in enumerate(results) if r[0] == 0), exited_at

    print(
        "refused runs: error line, exit (s from the start):",
        {i: (error_at[i], exited_at[i]) for i in refused},
    )

    # Each part started once (by one command, the others waited and reused it) and stopped once,
    # by the last command out: a command that left stopped nothing another one used.
    events = (tmp_path / "logs" / "stack.log").read_text().splitlines()
    during = events[max(i for i, e in enumerate(events) if "(stack down)" in e) + 1 :]
    starts = [e for e in during if " started " in e]
    stops = [i for i, e in enumerate(during) if " stopped " in e]
    left = [i for i, e in enumerate(during) if " left;" in e]
    assert sorted(e.split()[-1] for e in starts) == ["bigquery-emulator", "postgres"], events
    assert len({e.split()[2] for e in starts}) == 1, "the parts were started by different commands"
    assert len(stops) == 2 and all("last command out" in during[i] for i in stops), events
    assert min(stops) > max(left, default=-1), events
    status = json.loads(refresh("stack", "status").stdout.strip().splitlines()[-1])
    assert status == {"postgres": "down", "bigquery-emulator": "down"}, "left running"
    assert not list((tmp_path / "stack-users").glob("*")), "a lease or marker was left behind"
    for out in outs:
        out.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_flow_run_adopts_the_lock_its_command_took(settings: Settings) -> None:
    """`refresh run` takes the refresh lock before Prefect starts; the flow run in that process
    uses that lock (another session's try-lock would refuse it) and releases it when it ends."""
    from flows.control.runs import refresh_lock
    from flows.core.db import connect
    from flows.orchestration.daily_refresh import _refresh_lock, lock_taken_by_caller

    with refresh_lock(settings) as taken, lock_taken_by_caller(taken):
        with _refresh_lock(settings, "cli") as conn:
            assert conn is taken
        assert taken.closed, "the lock outlived the run"
    with _refresh_lock(settings, "cli") as own, connect(settings, autocommit=True) as other:
        assert own is not taken
        row = other.execute("select pg_try_advisory_lock(%s)", (REFRESH_LOCK_KEY,)).fetchone()
        assert row == (False,), "the flow ran without the lock"


def test_refused_run_backfill_and_demo_exit_at_once_while_the_winner_runs() -> None:
    """On a running stack, with a backfill holding the refresh lock: `run`, `backfill` and
    `demo` started then are each refused in one line and each process ends within seconds of
    its message (1-3 s on a loaded 2-core machine), while the winner is still running: nothing
    of theirs waits for it."""
    tmp_path = Path(tempfile.mkdtemp(prefix="sqp-refused-"))
    env = own_stack_env(tmp_path)

    def refresh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([REFRESH, *args], env=env, capture_output=True, text=True, timeout=900)

    sample = ["--sqp-rows", "300", "--weeks", "3"]
    try:
        assert refresh("stack", "up").returncode == 0
        assert refresh("generate", *sample, "--asins", "5", "--daily-rows", "100").returncode == 0
        settings = Settings(
            _env_file=None, state_dir=tmp_path, local_pg_port=int(env["REFRESH_LOCAL_PG_PORT"])
        )  # type: ignore[call-arg]
        winner = subprocess.Popen(
            [REFRESH, "backfill", "--start-date", "2020-01-01", "--end-date", "2020-12-31"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import psycopg

        deadline = time.monotonic() + 120
        with psycopg.connect(settings.dsn(), autocommit=True) as conn:
            while not conn.execute(
                "select count(*) from pg_locks where locktype = 'advisory' and objid = %s and granted",
                (REFRESH_LOCK_KEY,),
            ).fetchone()[0]:  # type: ignore[index]
                assert winner.poll() is None and time.monotonic() < deadline, "the winner never took the lock"
                time.sleep(0.1)
        commands = {
            "run": ["run", "--force"],
            "backfill": ["backfill", "--start-date", "2020-01-01", "--end-date", "2020-12-31"],
            "demo": ["demo", *sample],
        }
        t0 = time.monotonic()
        procs = {
            name: subprocess.Popen(
                [REFRESH, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            for name, args in commands.items()
        }
        error_at: dict[str, float] = {}
        exited_at: dict[str, float] = {}
        stderr: dict[str, str] = {}

        def follow(name: str, p: subprocess.Popen[str]) -> None:
            assert p.stderr is not None
            lines = []
            for line in p.stderr:
                if line.startswith("error:"):
                    error_at.setdefault(name, time.monotonic() - t0)
                lines.append(line)
            p.wait(timeout=600)
            exited_at[name] = time.monotonic() - t0
            stderr[name] = "".join(lines)

        threads = [threading.Thread(target=follow, args=item) for item in procs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        winner_running = winner.poll() is None
        winner.wait(timeout=600)
        print("refused: error line, exit (s):", {n: (error_at.get(n), exited_at.get(n)) for n in commands})
        for name, p in procs.items():
            assert p.returncode == 1 and "another refresh is running" in stderr[name], (name, stderr[name])
            assert exited_at[name] - error_at[name] < 5, (name, error_at, exited_at)
        assert winner_running, "the winner ended before the refused commands: nothing was measured"
    finally:
        refresh("stack", "down")
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("command", ["run", "backfill", "demo"])
def test_a_refused_command_that_started_the_stack_frees_its_output_at_once(command: str) -> None:
    """A command started on a stack that is down starts both parts, then finds another refresh
    holding the lock (here the test, as a run would: the lock and a lease on the stack): it is
    refused, and its stdout and stderr (pipes, as under `| tee`, `$(...)` or CI) reach EOF and
    its process ends within seconds of its message, while the parts it started run on for the
    refresh that holds the lock; the last one out stops them."""
    from flows.control.runs import refresh_lock
    from flows.demo.local_stack import LocalStack

    tmp_path = Path(tempfile.mkdtemp(prefix="sqp-refused-starter-"))
    env = own_stack_env(tmp_path)
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path,
        local_pg_port=int(env["REFRESH_LOCAL_PG_PORT"]),
        local_bq_rest_port=int(env["REFRESH_LOCAL_BQ_REST_PORT"]),
        local_bq_grpc_port=int(env["REFRESH_LOCAL_BQ_GRPC_PORT"]),
    )  # type: ignore[call-arg]
    args = {
        "run": ["run", "--force"],
        "backfill": ["backfill", "--start-date", "2020-01-01", "--end-date", "2020-12-31"],
        "demo": ["demo", "--sqp-rows", "300", "--weeks", "3"],
    }[command]
    t0 = time.monotonic()
    proc = subprocess.Popen([REFRESH, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict[str, float] = {}
    text: dict[str, bytes] = {}

    def follow(name: str, stream: IO[bytes]) -> None:
        chunks = []
        for line in stream:
            if line.startswith(b"error:"):
                seen.setdefault("error", time.monotonic() - t0)
            chunks.append(line)
        seen[f"{name} EOF"] = time.monotonic() - t0
        text[name] = b"".join(chunks)

    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=follow, args=("stdout", proc.stdout), daemon=True),
        threading.Thread(target=follow, args=("stderr", proc.stderr), daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        # The lock, once the command has started Postgres and while it starts the emulator.
        import psycopg

        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "Postgres never came up"
            try:
                psycopg.connect(settings.dsn(), connect_timeout=2).close()
                break
            except psycopg.Error:
                time.sleep(0.1)
        with refresh_lock(settings, trigger="test") as _lock:
            lease = LocalStack(settings)
            lease.start()  # waits for the command's emulator start; reuses both parts
            try:
                proc.wait(timeout=300)
                seen["exit"] = time.monotonic() - t0
                for r in readers:
                    r.join(timeout=30)
                stderr = text.get("stderr", b"").decode()
                print(f"refused {command}: seconds from its start:", seen)
                assert proc.returncode == 1 and "another refresh is running" in stderr, stderr
                assert "stdout EOF" in seen and "stderr EOF" in seen, ("a pipe is still open", seen)
                for event in ("stdout EOF", "stderr EOF", "exit"):
                    assert seen[event] - seen["error"] < 3, (event, seen)
                events = (tmp_path / "logs" / "stack.log").read_text().splitlines()
                starts = {e.split()[-1]: e.split()[2] for e in events if " started " in e}
                assert starts == {"postgres": str(proc.pid), "bigquery-emulator": str(proc.pid)}, events
                assert lease.status() == {"postgres": "up", "bigquery-emulator": "up"}, "stopped under a user"
            finally:
                lease.stop()
        assert LocalStack(settings).status() == {"postgres": "down", "bigquery-emulator": "down"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        LocalStack(settings).stop_all()
        shutil.rmtree(tmp_path, ignore_errors=True)
