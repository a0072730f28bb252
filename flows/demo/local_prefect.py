"""The local Prefect server (`prefect server start`, SQLite under its Prefect home), one of the
embedded parts, and throwaway standing servers for tests and benchmarks.

A Prefect API the user configured (PREFECT_API_URL, a Prefect profile) always wins: the stack then
has no Prefect part. Without one, the stack's server is the API every command reports to, so
every run (CLI, demo, backfill, schedule, API trigger) is in its UI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from flows.core.errors import StackError
from flows.core.settings import Settings, local_prefect_api_url
from flows.demo.processes import await_ready, free_port, pid_alive, pid_from_file, port_is_free, stop_group

log = logging.getLogger(__name__)


class PrefectServerUnavailable(StackError):
    """The local Prefect server did not start (not a taken port): commands fall back to
    Prefect's ephemeral mode."""


def configured_prefect_api() -> str | None:
    """The Prefect API the user configured: PREFECT_API_URL in the environment, else in the
    active profile of Prefect's profiles file; None without one. Read without importing Prefect:
    a command refused before its flow starts must exit without Prefect's import and exit hooks."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(value) if value else None


def use_prefect_api(url: str | None) -> None:
    """Make `url` this process's Prefect API (None: none, Prefect's ephemeral mode), also for a
    Prefect imported already and for the processes this one starts."""
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _launch(home: Path, port: int, log: IO[bytes], **env_overrides: str) -> subprocess.Popen[bytes]:
    """`prefect server start` on 127.0.0.1:`port` in a session of its own, `home` as its
    PREFECT_HOME (its SQLite database), no usage statistics sent."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **env_overrides,
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )


@dataclass
class LocalPrefectServer:
    """The stack's Prefect server: API at http://127.0.0.1:`port`/api, UI at its root."""

    home: Path
    port: int
    log_file: Path
    startup_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_here: bool = field(default=False, init=False)

    @property
    def api_url(self) -> str:
        return local_prefect_api_url(self.port)

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.log_file.parent / f"prefect-server-{self.port}.pid"

    def running_pid(self) -> int | None:
        return pid_from_file(self.pid_file, (b"prefect",), self.port)

    def is_ready(self) -> bool:
        return _healthy(self.api_url)

    def start(self) -> None:
        pid = self.running_pid()
        if pid is not None and await_ready(
            self.is_ready,
            lambda: self.running_pid() == pid,
            self.startup_timeout_s,
            f"the Prefect server (pid {pid}) did not answer on port {self.port} within "
            f"{self.startup_timeout_s:.0f}s: stop it with `refresh stack down`; see its log {self.log_file}",
        ):
            log.info("Prefect server already running on port %s", self.port)
            return
        if not port_is_free(self.port):
            raise StackError(
                f"port {self.port} for the Prefect server is taken: set REFRESH_LOCAL_PREFECT_PORT to a "
                f"free port, or PREFECT_API_URL to the Prefect server there (http://127.0.0.1:{self.port}/api)"
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as logf:
            self.process = _launch(self.home, self.port, logf)
        self.started_here = True
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.is_ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.process.poll()
                self.stop()
                self.started_here = False
                why = f"exited with code {code}" if code is not None else "did not answer"
                raise PrefectServerUnavailable(
                    f"the Prefect server {why} within {self.startup_timeout_s:.0f}s (log {self.log_file})"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        pid = self.process.pid if self.process is not None else self.running_pid()
        if pid is not None and pid_alive(pid):
            stop_group(pid, self.process, grace_s=20)
        self.pid_file.unlink(missing_ok=True)


@contextlib.contextmanager
def standing_prefect_server(
    home: Path, timeout_s: float = 180, **env_overrides: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `prefect server start` on a free port, in a session of its own, with `home` as its
    PREFECT_HOME (SQLite database, log `home`/server.log): (its API URL, its process) once
    /health answers; StackError if it does not within `timeout_s`. Stopped with its process
    group at the end. For benchmarks and tests that run flows against a standing server, as
    the daily deployment does (`refresh serve`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as logf:
        proc = _launch(home, port, logf, **{"PREFECT_UI_ENABLED": "false", **env_overrides})
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"prefect server did not start within {timeout_s:.0f} s: see {log_path}")
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_group(proc.pid, proc, grace_s=20)


def prefect_ui(settings: Settings) -> tuple[str, bool]:
    """The Prefect UI that shows this process's runs, and whether it is the stack's server: the
    UI of a Prefect API the user configured (PREFECT_UI_URL, Prefect Cloud's app), else the
    stack's (runs made on Prefect's ephemeral mode are in its database too)."""
    api = configured_prefect_api()
    if api and api != settings.local_prefect_api:
        from prefect.settings import get_current_settings

        ui = get_current_settings().ui_url
        if ui:
            return ui.rstrip("/"), False
    return settings.local_prefect_api.removesuffix("/api"), True


def flow_run_url(ui: str, flow_run_id: object) -> str:
    return f"{ui}/runs/flow-run/{flow_run_id}"
