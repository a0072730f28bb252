"""A newcomer's first command, as a shell, cron or CI would run it: the `refresh` console
script in a subprocess with a bare environment (no XDG_RUNTIME_DIR, no PREFECT_* or DBT_*
settings, no terminal), on its own embedded Postgres and emulator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.demo.local_stack import free_port

TABLES = ("search_query_performance", "products", "daily_search_terms")


def test_refresh_demo_in_a_bare_environment_prints_no_warnings_and_a_readable_table(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "REFRESH_STATE_DIR": str(tmp_path / "state"),
        "REFRESH_LOCAL_PG_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_REST_PORT": str(free_port()),
        "REFRESH_LOCAL_BQ_GRPC_PORT": str(free_port()),
        "REFRESH_LOCAL_PREFECT_PORT": str(free_port()),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    refresh = Path(sys.executable).parent / "refresh"
    done = subprocess.run(
        [str(refresh), "demo", "--sqp-rows", "300", "--weeks", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for noise in ("RuntimeDirWarning", "XDG_RUNTIME_DIR", "telemetry", "Telemetry", "anonymous usage"):
        assert noise not in done.stderr, done.stderr[-3000:]
    # stdout is a pipe: every table row on one line, no cell wrapped ("succe" / "ss")
    rows = [
        line.split() for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in TABLES
    ]
    assert sorted(r[0] for r in rows) == sorted(TABLES), done.stdout
    assert all(r[1:3] == ["success", "live"] for r in rows), done.stdout
    assert "refresh success: 3 table(s) refreshed" in done.stdout
