"""Three `refresh run` started together on a state directory whose embedded stack is down:
the stack starts once, one run refreshes, the others are refused in one line, and the stack
is stopped afterwards by the command that started it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flows.local_stack import free_port

REFRESH = str(Path(sys.executable).parent / "refresh")


def test_three_runs_started_together_on_a_stack_that_is_down(tmp_path: Path) -> None:
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
    pg_log = tmp_path / "logs" / "postgres.log"
    starts_before = pg_log.read_text().count("ready to accept connections")

    procs = [
        subprocess.Popen(
            [REFRESH, "run", "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=900), *p.communicate()) for p in procs]

    winners = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    assert "refresh success" in winners[0][1], winners[0]
    for rc, _out, err in refused:
        lines = err.strip().splitlines()
        assert rc == 1 and "another refresh is running" in err and "Traceback" not in err, err
        assert [line for line in lines if line.startswith("error:")] == lines[:1] or len(lines) <= 3, err
    assert pg_log.read_text().count("ready to accept connections") == starts_before + 1
    status = json.loads(refresh("stack", "status").stdout.strip().splitlines()[-1])
    assert status == {"postgres": "down", "bigquery-emulator": "down"}, "left running"
    assert not list((tmp_path / "stack-users").glob("*")), "a lease or marker was left behind"
