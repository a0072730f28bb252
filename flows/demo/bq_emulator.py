"""The BigQuery emulator (bqemulator) as a process of its own, with bounded Storage read sessions.

It is launched as `python -m flows.demo.local_stack start ...` (see run_emulator).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.core.errors import StackError
from flows.core.settings import EMULATOR_PROJECT
from flows.demo.processes import (
    await_ready,
    pid_alive,
    pid_from_file,
    port_accepts,
    port_is_free,
    stop_group,
    tail,
)

log = logging.getLogger(__name__)

EMULATOR_MESSAGE_CAP = 96 * 1024 * 1024


def ensure_spatial_extension() -> None:
    """The emulator loads DuckDB's spatial extension; install it from the PyPI wheel (offline)."""
    from duckdb_extensions import import_extension

    import_extension("spatial")


# The emulator keeps every Storage read session's materialised result (a pyarrow Table of the
# whole slice) in a module dict that nothing ever empties; real BigQuery expires sessions after
# 6 h. Sessions of killed runs (and finished ones) therefore pile up. Our launcher bounds it:
# sessions idle this long are dropped, and beyond the byte cap the least recently used ones
# idle for at least EMULATOR_SESSION_MIN_IDLE_S go first (a stream being read keeps its slice
# referenced, so only a resume after that long would miss it).
EMULATOR_SESSION_TTL_S = 900.0
EMULATOR_SESSION_MIN_IDLE_S = float(os.environ.get("SQP_EMULATOR_SESSION_MIN_IDLE_S", "30"))
EMULATOR_SESSION_CAP_BYTES = int(os.environ.get("SQP_EMULATOR_SESSION_CAP_MB", "1024")) * 1024 * 1024


class BoundedReadSessions(OrderedDict[str, Any]):
    """A drop-in for bqemulator's read-session dict that forgets idle sessions (LRU order)."""

    def __init__(
        self,
        cap_bytes: int = EMULATOR_SESSION_CAP_BYTES,
        ttl_s: float = EMULATOR_SESSION_TTL_S,
        min_idle_s: float = EMULATOR_SESSION_MIN_IDLE_S,
    ) -> None:
        super().__init__()
        self.cap_bytes, self.ttl_s, self.min_idle_s = cap_bytes, ttl_s, min_idle_s
        self.last_used: dict[str, float] = {}
        # The emulator's gRPC threads create and read sessions at once: reordering (get) or
        # evicting while another thread iterates is "OrderedDict mutated during iteration".
        self._lock = threading.RLock()

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self._touch(key)
            self._evict(keep=key)

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            if key in self:
                self._touch(key)
            return super().get(key, default)

    def _touch(self, key: str) -> None:
        self.last_used[key] = time.monotonic()
        self.move_to_end(key)

    def _evict(self, keep: str) -> None:
        now = time.monotonic()
        total = sum(int(getattr(getattr(v, "table", None), "nbytes", 0)) for v in self.values())
        dropped = False
        for name in list(self):  # least recently used first
            idle = now - self.last_used.get(name, now)
            if name == keep or not (
                idle > self.ttl_s or (total > self.cap_bytes and idle >= self.min_idle_s)
            ):
                continue
            total -= int(getattr(getattr(self[name], "table", None), "nbytes", 0))
            super().__delitem__(name)
            self.last_used.pop(name, None)
            dropped = True
        if dropped:
            import pyarrow as pa

            pa.default_memory_pool().release_unused()


def run_emulator(argv: list[str]) -> None:
    """`python -m flows.demo.local_stack ARGS`: bqemulator's command line with bounded read sessions."""
    from bqemulator.cli import main
    from bqemulator.streaming import read_session

    read_session._SESSIONS = BoundedReadSessions()
    sys.argv = ["bqemulator", *argv]
    main()


@dataclass
class BigQueryEmulator:
    rest_port: int
    grpc_port: int
    data_dir: Path | None  # None = throwaway (in-memory)
    log_file: Path
    project: str = EMULATOR_PROJECT
    startup_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_here: bool = field(default=False, init=False)

    @property
    def pid_file(self) -> Path:
        return self.log_file.parent / f"bqemulator-{self.rest_port}.pid"

    def running_pid(self) -> int | None:
        """The emulator process the pid file names, if it still runs."""
        return pid_from_file(self.pid_file, (b"flows.demo.local_stack", b"bqemulator"), self.rest_port)

    def is_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.rest_port}/bigquery/v2/projects/{self.project}/datasets"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                ok = resp.status == 200
        except (urllib.error.URLError, OSError):
            return False
        return ok and port_accepts(self.grpc_port)

    def start(self) -> None:
        pid = self.running_pid()
        if pid is not None and await_ready(
            self.is_ready,
            lambda: self.running_pid() == pid,
            self.startup_timeout_s,
            f"the BigQuery emulator (pid {pid}) did not answer on port {self.rest_port} within "
            f"{self.startup_timeout_s:.0f}s: stop it with `refresh stack down`; see its log "
            f"{self.log_file}",
        ):
            log.info("BigQuery emulator already running on port %s", self.rest_port)
            return
        if self.is_ready():  # one that another program (or an older release) started
            log.info("BigQuery emulator already running on port %s", self.rest_port)
            return
        for port, var in ((self.rest_port, "REST"), (self.grpc_port, "GRPC")):
            if not port_is_free(port):
                raise StackError(
                    f"port {port} for the BigQuery emulator is taken: set "
                    f"REFRESH_LOCAL_BQ_{var}_PORT to a free port"
                )
        ensure_spatial_extension()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "flows.demo.local_stack",  # bqemulator with bounded read sessions, see run_emulator
            "start",
            "--project",
            self.project,
            "--rest-port",
            str(self.rest_port),
            "--grpc-port",
            str(self.grpc_port),
            "--log-level",
            "warning",
            "--no-admin",
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--persistent", "--data-dir", str(self.data_dir)]
        else:
            cmd += ["--ephemeral"]
        # The emulator caps one gRPC message at ~11 MB, less than one 65,536-row Storage batch of
        # SQP rows (~28 MB); real BigQuery sizes its messages itself. Raise the cap.
        env = {**os.environ}
        env.setdefault("BQEMU_WRITE_API_MAX_REQUEST_BYTES", str(EMULATOR_MESSAGE_CAP))
        with self.log_file.open("ab") as logf:
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.log_file.parent,
            )
        self.started_here = True
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.is_ready():
            if self.process.poll() is not None:
                raise StackError(
                    f"the BigQuery emulator exited with code {self.process.returncode} during "
                    f"start-up; log {self.log_file}:\n{tail(self.log_file)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(
                    f"the BigQuery emulator did not answer within {self.startup_timeout_s:.0f}s; "
                    f"log {self.log_file}:\n{tail(self.log_file)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        pid = self.process.pid if self.process is not None else self.running_pid()
        if pid is not None and pid_alive(pid):
            stop_group(pid, self.process)
        self.pid_file.unlink(missing_ok=True)
