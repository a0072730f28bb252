"""Bad configuration through the real `refresh` command: one line naming what to fix, exit 1,
no traceback, and never the password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.core.settings import Settings
from flows.demo.local_stack import free_port
from tests.integration.pg_password import SECRET_PASSWORD, SECRET_USER, password_dsn

REFRESH = str(Path(sys.executable).parent / "refresh")


def _refresh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REFRESH, *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def _bad_dsns(settings: Settings) -> dict[str, str]:
    port = settings.local_pg_port
    pw = SECRET_PASSWORD
    return {
        "malformed": f"host=127.0.0.1 port={port} user={SECRET_USER} password={pw} dbname",
        "bad-percent-escape": f"postgresql://{SECRET_USER}:{pw}%zz@127.0.0.1:{port}/postgres",
        "refused-port": f"postgresql://{SECRET_USER}:{pw}@127.0.0.1:{free_port()}/postgres",
        "wrong-host": f"postgresql://{SECRET_USER}:{pw}@no-such-host.invalid:{port}/postgres",
        "wrong-password": password_dsn(settings, password=pw + "-wrong"),
    }


@pytest.mark.parametrize("command", [["status"], ["run", "--no-stack"]], ids=["status", "run"])
def test_bad_pg_dsn_is_one_line_naming_the_setting_without_the_password(
    settings: Settings, command: list[str]
) -> None:
    failures = []
    for case, dsn in _bad_dsns(settings).items():
        result = _refresh(*command, REFRESH_PG_DSN=dsn)
        output = result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        checks = {
            "exit code 1": result.returncode == 1,
            "at most 3 lines on stderr": len(lines) <= 3,
            "no traceback": "Traceback" not in output,
            "names REFRESH_PG_DSN": "REFRESH_PG_DSN" in lines[0] if lines else False,
            "no password": SECRET_PASSWORD not in output,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            failures.append(f"{case}: {failed} (rc {result.returncode}):\n{output[-3000:]}")
    assert not failures, "\n".join(failures)


def test_registry_file_that_is_not_yaml_is_one_line_with_line_and_column(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "tables.yml"
    bad.write_text("tables:\n  sqp_weekly:\n    source_table: [unclosed\n    mode: live\n")
    result = _refresh("run", "--no-stack", REFRESH_TABLES_FILE=str(bad))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr
    assert str(bad) in lines[0] and "line 4, column 9" in lines[0], lines
    assert "Postgres" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["status"], "REFRESH_WEBHOOK_TIMEOUT_S", "soon"),
        (["status"], "REFRESH_WEBHOOK_HORIZON_HOURS", "0"),
        (["api", "--no-stack"], "REFRESH_API_PORT", "70000"),
        (["api", "--no-stack"], "REFRESH_API_STATUS_CACHE_SECONDS", "-1"),
        (["webhooks", "list"], "REFRESH_API_POOL_SIZE", "0"),
    ],
)
def test_bad_webhook_and_api_settings_are_one_line_naming_the_variable(
    settings: Settings, command: list[str], variable: str, value: str
) -> None:
    """Every setting lives in flows.core.settings: a bad one stops any command at start, named as
    the user sets it, whether or not that command uses it."""
    result = _refresh(*command, **{variable: value})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(lines) <= 3 and "Traceback" not in result.stderr, result.stderr
    assert variable in lines[0], lines
