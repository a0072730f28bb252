"""A real `prefect server start` for the tests that need one (deployments, secrets scans)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.core.errors import StackError
from flows.demo.local_stack import standing_prefect_server


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def prefect_server(home: Path, **env_overrides: str) -> Iterator[str]:
    """A Prefect server on a free port with `home` as its PREFECT_HOME (and SQLite database);
    yields its API URL and stops it at the end. The scheduler is off: runs start only when a
    test creates them, never at an unlucky minute."""
    env = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", **env_overrides}
    with contextlib.ExitStack() as stack:
        try:
            url, _ = stack.enter_context(standing_prefect_server(home, timeout_s=180, **env))
        except StackError as exc:
            pytest.fail(f"{exc}\n{tail(home / 'server.log')}")
        yield url
