"""Three `refresh run` started together on a state directory whose embedded stack is down:
none fails starting the stack, runs that overlap the one refreshing are refused in one line,
and the stack is stopped afterwards (no lease or marker left)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flows.local_stack import free_port

REFRESH = str(Path(sys.executable).parent / "refresh")


def test_three_runs_started_together_on_a_stack_that_is_down() -> None:
    # Not pytest's tmp_path: its base is mode 0700, out of reach of the `pgserver` user that
    # runs Postgres as root, and pytest resets that mode whenever another session starts.
    tmp_path = Path(tempfile.mkdtemp(prefix="sqp-concurrent-"))
    env = {
        **os.environ,
        "REFRESH_STATE_DIR": str(tmp_path),
        "REFRESH_LOCAL_PG_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "COLUMNS": "200",
    }

    def refresh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([REFRESH, *args], env=env, capture_output=True, text=True, timeout=900)

    assert refresh("stack", "up").returncode == 0
    sample = ["--sqp-rows", "300", "--weeks", "3", "--asins", "5", "--daily-rows", "100"]
    assert refresh("generate", *sample).returncode == 0
    assert refresh("stack", "down").returncode == 0

    procs = [
        subprocess.Popen(
            [REFRESH, "run", "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=900), *p.communicate()) for p in procs]

    # Runs that overlap the winner are refused; one that reaches the lock after the winner
    # ended (the machine is slow, Prefect start-ups are serialised) refreshes after it.
    winners = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert winners and all("refresh success" in out for _rc, out, _err in winners), results
    for rc, _out, err in refused:
        lines = [
            line for line in err.strip().splitlines() if "Warning" not in line and "return Path" not in line
        ]
        assert rc == 1 and "another refresh is running" in err and "Traceback" not in err, err
        assert len(lines) <= 3 and lines[0].startswith("error:"), err
    status = json.loads(refresh("stack", "status").stdout.strip().splitlines()[-1])
    assert status == {"postgres": "down", "bigquery-emulator": "down"}, "left running"
    assert not list((tmp_path / "stack-users").glob("*")), "a lease or marker was left behind"
    shutil.rmtree(tmp_path, ignore_errors=True)
