"""The embedded Postgres 16 (the pgserver wheel's binaries) on a data directory under the state
directory, password login over TCP."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.core.errors import StackError
from flows.core.private_files import create_once
from flows.core.settings import PG_PASSFILE, embedded_dsn
from flows.demo.processes import await_ready, pid_alive, port_is_free, tail

log = logging.getLogger(__name__)

_PG_SYSTEM_USER = "pgserver"  # postgres refuses to run as root; pgserver's convention
# Over TCP everyone needs the password; the Unix socket is in the data directory, which only
# the server's owner can enter (postgres keeps it 0700), so it stays the way in to set it.
PG_HBA = """# Written by sqp-refresh (flows/demo/embedded_postgres.py); rewritten when it differs.
local   all   all                  trust
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


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
        return pid if pid_alive(pid) else None

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
                    f"{self.startup_timeout_s:.0f}s; log:\n{tail(self.log_file)}"
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

        if not await_ready(
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
                f"{(exc.stderr or exc.stdout).strip()}\nlog:\n{tail(self.log_file)}"
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
