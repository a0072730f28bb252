"""The embedded local stack: Postgres 16 from the pgserver wheel and the BigQuery emulator.

Both keep their data under the state directory (reused between runs) unless told to be
throwaway. Each part is replaced by the real thing when configured: a Postgres DSN
(REFRESH_PG_DSN) or a BigQuery project (REFRESH_BQ_PROJECT).

A part that this process started is stopped when the stack context exits; a part that was
already running (for example from `refresh stack up`) is reused and left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from flows.core.errors import StackError
from flows.core.private_files import create_once
from flows.core.settings import EMULATOR_PROJECT, PG_PASSFILE, Settings, embedded_dsn

log = logging.getLogger(__name__)

_PG_SYSTEM_USER = "pgserver"  # postgres refuses to run as root; pgserver's convention
# Over TCP everyone needs the password; the Unix socket is in the data directory, which only
# the server's owner can enter (postgres keeps it 0700), so it stays the way in to set it.
PG_HBA = """# Written by sqp-refresh (flows/demo/local_stack.py); rewritten when it differs.
local   all   all                  trust
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""
EMULATOR_MESSAGE_CAP = 96 * 1024 * 1024


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (tests, benchmarks, throwaway servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        **env_overrides,
    }
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"prefect server did not start within {timeout_s:.0f} s: see {log_path}")
            time.sleep(0.5)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _await_ready(
    is_ready: Callable[[], bool], alive: Callable[[], bool], timeout_s: float, late: str
) -> bool:
    """Wait for a part whose process runs but does not answer yet (still starting, or too busy
    to answer a readiness check on a loaded machine) rather than start a second one on its
    ports and data: True once it answers, False if its process ended first, StackError(`late`)
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not is_ready():
        if not alive():
            return False
        if time.monotonic() > deadline:
            raise StackError(late)
        time.sleep(0.2)
    return True


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int
    startup_timeout_s: float = 60.0
    started_here: bool = field(default=False, init=False)

    @property
    def passfile(self) -> Path:
        """The `postgres` role's password in libpq's passfile format, 0600, beside the data."""
        return self.data_dir.parent / PG_PASSFILE

    @property
    def dsn(self) -> str:
        return embedded_dsn(self.port, self.passfile)

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "logs" / "postgres.log"

    def _bin(self, name: str) -> str:
        from pgserver._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _run_as(self) -> str | None:
        return _PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _prepare_root(self) -> None:
        """As root, postgres runs as the `pgserver` user: give it the folders it needs."""
        if os.geteuid() != 0:
            return
        import pwd
        import stat

        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(_PG_SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        perm = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, perm)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
        for path in (self.data_dir, self.log_file.parent):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.log_file.exists():
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)

    def running_pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return None
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def _running_port(self) -> int | None:
        """The port in postmaster.pid (its fourth line), None if it is not there."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, ValueError, IndexError):
            return None

    def is_ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("select 1")
            return True
        except psycopg.Error:
            return False

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        pid = self.running_pid()
        if pid is not None and self._reuse(pid):
            return
        if not port_is_free(self.port):
            raise StackError(
                f"port {self.port} is taken by another program: set REFRESH_LOCAL_PG_PORT to a "
                "free port, or point REFRESH_PG_DSN at an existing Postgres"
            )
        self._prepare_root()
        user = self._run_as()
        if not (self.data_dir / "PG_VERSION").exists():
            log.info("initialising embedded Postgres in %s", self.data_dir)
            self._pg(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "-U",
                    "postgres",
                ],
                user,
                "initdb",
            )
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}"
        self._pg(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                opts,
                "-w",
                "-t",
                str(int(self.startup_timeout_s)),
                "start",
            ],
            user,
            "pg_ctl start",
        )
        self.started_here = True
        self._secure()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise StackError(
                    f"embedded Postgres did not accept connections within "
                    f"{self.startup_timeout_s:.0f}s; log:\n{_tail(self.log_file)}"
                )
            time.sleep(0.2)

    def _reuse(self, pid: int) -> bool:
        """The server already running on the data directory, once it answers: True; False if
        it stopped meanwhile (then it is started as usual)."""
        if self._running_port() not in (None, self.port):
            raise StackError(
                f"a Postgres server (pid {pid}) runs on {self.data_dir} on port "
                f"{self._running_port()}, not {self.port}: stop it with `refresh stack down` or "
                "set REFRESH_LOCAL_PG_PORT to the port it uses"
            )
        secured = False

        def ready() -> bool:
            nonlocal secured
            if not secured:
                with contextlib.suppress(StackError):
                    self._secure()  # a server started before passwords: upgraded in place
                    secured = True
            return secured and self.is_ready()

        if not _await_ready(
            ready,
            lambda: self.running_pid() == pid,
            self.startup_timeout_s,
            f"a Postgres server (pid {pid}) runs on {self.data_dir} but did not answer on port "
            f"{self.port} within {self.startup_timeout_s:.0f}s: stop it with `refresh stack down` "
            "or set REFRESH_LOCAL_PG_PORT to the port it uses",
        ):
            return False
        log.info("embedded Postgres already running on port %s", self.port)
        return True

    def _password(self) -> str:
        line = create_once(self.passfile, lambda: f"*:*:*:postgres:{secrets.token_urlsafe(24)}\n".encode())
        return line.decode().strip().rsplit(":", 1)[1]

    def _secure(self) -> None:
        """Password login over TCP: the generated password set on the `postgres` role (over the
        Unix socket) and pg_hba.conf ours. Idempotent; it also upgrades a data directory that
        was created trusting every local connection."""
        import psycopg
        from psycopg import sql

        password = self._password()
        hba = self.data_dir / "pg_hba.conf"
        if hba.read_text() != PG_HBA:
            hba.write_text(PG_HBA)  # written in place: the server's user keeps owning it
        try:
            with psycopg.connect(
                host=str(self.data_dir),
                port=self.port,
                user="postgres",
                dbname="postgres",
                autocommit=True,
                connect_timeout=5,
            ) as conn:
                conn.execute(sql.SQL("alter role postgres password {}").format(sql.Literal(password)))
                conn.execute("select pg_reload_conf()")
        except psycopg.Error as exc:
            raise StackError(f"embedded Postgres: cannot set its password ({exc})") from None

    def _pg(self, cmd: list[str], user: str | None, what: str) -> None:
        try:
            subprocess.run(
                cmd,
                check=True,
                capture_output=True,
                text=True,
                user=user,
                timeout=self.startup_timeout_s + 30,
                cwd=self.data_dir,
            )
        except subprocess.CalledProcessError as exc:
            raise StackError(
                f"embedded Postgres: {what} failed ({exc.returncode}): "
                f"{(exc.stderr or exc.stdout).strip()}\nlog:\n{_tail(self.log_file)}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"embedded Postgres: {what} timed out") from exc

    def stop(self) -> None:
        if self.running_pid() is None:
            return
        with contextlib.suppress(StackError):
            self._pg(
                [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                self._run_as(),
                "pg_ctl stop",
            )


# --------------------------------------------------------------------------------------
# BigQuery emulator
# --------------------------------------------------------------------------------------


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


def _run_emulator(argv: list[str]) -> None:
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
        """The emulator process the pid file names, if it still runs (a pid the system gave
        to another program since does not count, where /proc tells)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid  # no /proc (macOS): alive is all we can tell
        launcher = any(b"flows.demo.local_stack" in a or b"bqemulator" in a for a in argv)
        ours = launcher and str(self.rest_port).encode() in argv
        return pid if ours else None

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
        if pid is not None and _await_ready(
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
            "flows.demo.local_stack",  # bqemulator with bounded read sessions, see _run_emulator
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
                    f"start-up; log {self.log_file}:\n{_tail(self.log_file)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(
                    f"the BigQuery emulator did not answer within {self.startup_timeout_s:.0f}s; "
                    f"log {self.log_file}:\n{_tail(self.log_file)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        pid = self.process.pid if self.process is not None else self.running_pid()
        if pid is None or not _pid_alive(pid):
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _pid_alive(pid) and time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        self.pid_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------


@dataclass
class LocalStack:
    """The embedded parts, shared safely by every command on one state directory.

    Starting is serialised by a file lock (the first command starts, the others wait and reuse).
    Each command holds a lease while it uses the stack; a part started by a command (not by
    `refresh stack up`) is stopped by the last command to leave, so nobody stops a part that
    another command is still using.
    """

    settings: Settings
    throwaway: bool = False
    keep_running: bool = False  # `refresh stack up`: parts stay up after this command
    postgres: EmbeddedPostgres | None = None
    emulator: BigQueryEmulator | None = None
    _started: list[EmbeddedPostgres | BigQueryEmulator] = field(default_factory=list)
    _lease: IO[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        s = self.settings
        if s.uses_embedded_postgres:
            self.postgres = EmbeddedPostgres(s.pg_data_dir, s.local_pg_port, s.local_startup_timeout_s)
        if s.starts_local_emulator:
            self.emulator = BigQueryEmulator(
                rest_port=s.local_bq_rest_port,
                grpc_port=s.local_bq_grpc_port,
                data_dir=None if self.throwaway else s.bq_data_dir,
                log_file=s.state_dir / "logs" / "bqemulator.log",
                startup_timeout_s=s.local_startup_timeout_s,
            )

    @property
    def _users_dir(self) -> Path:
        return self.settings.state_dir / "stack-users"

    def _parts(self) -> dict[str, EmbeddedPostgres | BigQueryEmulator]:
        named = {"postgres": self.postgres, "bigquery-emulator": self.emulator}
        return {name: part for name, part in named.items() if part is not None}

    def _marker(self, name: str) -> Path:
        """Present while the part runs because a command (not `stack up`) started it."""
        return self._users_dir / f"{name}.started-by-command"

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One command at a time starts or stops parts on this state directory."""
        self._users_dir.mkdir(parents=True, exist_ok=True)
        with (self.settings.state_dir / "stack.lock").open("ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _record(self, event: str) -> None:
        """One line in <state_dir>/logs/stack.log: which command started or stopped which part."""
        path = self.settings.state_dir / "logs" / "stack.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with path.open("a") as f:
            f.write(f"{stamp} pid {os.getpid()} {event}\n")

    def _other_users(self) -> int:
        """Commands that hold a lease now (a lease whose lock is free belonged to a dead one)."""
        alive = 0
        for path in self._users_dir.glob("*.lease"):
            if self._lease is not None and path.name == Path(self._lease.name).name:
                continue
            try:
                with path.open("ab") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                alive += 1
            except OSError:
                continue
            else:
                path.unlink(missing_ok=True)
        return alive

    def start(self) -> None:
        with self._exclusive():
            try:
                for name, part in self._parts().items():
                    # Not "was it ready": a part too busy to answer one check is still running,
                    # and reused (part.start waits for it) without a start recorded.
                    part.start()
                    if part.started_here:
                        self._record(f"started {name}")
                    if self.keep_running:
                        self._marker(name).unlink(missing_ok=True)
                    elif part.started_here:
                        self._started.append(part)
                        self._marker(name).touch()
            except BaseException:
                self._stop_started()
                raise
            if not self.keep_running:
                lease = self._users_dir / f"{os.getpid()}-{id(self):x}.lease"
                self._lease = lease.open("ab")
                fcntl.flock(self._lease, fcntl.LOCK_EX)

    def _stop_started(self) -> None:
        for name, part in reversed(self._parts().items()):
            if part in self._started:
                part.stop()
                self._record(f"stopped {name} (start-up failed)")
                self._marker(name).unlink(missing_ok=True)
        self._started.clear()

    def stop(self) -> None:
        """Leave the stack; the last command out stops the parts commands started."""
        with self._exclusive():
            lease, self._lease = self._lease, None
            if lease is not None:
                Path(lease.name).unlink(missing_ok=True)
                lease.close()
            others = self._other_users()
            if others:
                log.info("the embedded stack stays up: other commands use it")
                self._record(f"left; the stack stays up for {others} other command(s)")
                self._started.clear()
                return
            for name, part in reversed(self._parts().items()):
                if self._marker(name).exists():
                    part.stop()
                    self._record(f"stopped {name} (last command out)")
                    self._marker(name).unlink(missing_ok=True)
            self._started.clear()

    def status(self) -> dict[str, str]:
        out = {}
        if self.postgres is not None:
            out["postgres"] = "up" if self.postgres.is_ready() else "down"
        if self.emulator is not None:
            out["bigquery-emulator"] = "up" if self.emulator.is_ready() else "down"
        return out

    def stop_all(self) -> None:
        """Stop both parts even if another process started them (`refresh stack down`)."""
        with self._exclusive():
            for name, part in reversed(self._parts().items()):
                if part.is_ready():
                    self._record(f"stopped {name} (stack down)")
                part.stop()
                self._marker(name).unlink(missing_ok=True)

    def wipe(self) -> None:
        self.stop_all()
        for path in (self.settings.pg_data_dir, self.settings.bq_data_dir):
            shutil.rmtree(path, ignore_errors=True)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def local_stack(settings: Settings, throwaway: bool = False) -> Iterator[LocalStack]:
    """Start what is needed, yield, and stop what was started, also on SIGTERM."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM's default action skips `finally`: turn it into SystemExit so children stop.
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    stack = LocalStack(settings, throwaway=throwaway)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    _run_emulator(sys.argv[1:])
