"""The embedded local stack: Postgres 16 from the pgserver wheel, the BigQuery emulator and a
Prefect server, shared by every command on one state directory.

Each part keeps its data under the state directory (reused between runs) unless told to be
throwaway, and is replaced by the real thing when configured: a Postgres DSN (REFRESH_PG_DSN),
a BigQuery project (REFRESH_BQ_PROJECT), a Prefect API (PREFECT_API_URL).

A part that this process started is stopped when the stack context exits; a part that was
already running (for example from `refresh stack up`) is reused and left running.
`python -m flows.demo.local_stack` runs the BigQuery emulator (flows.demo.bq_emulator).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

from flows.core.settings import Settings
from flows.demo.bq_emulator import BigQueryEmulator, BoundedReadSessions, run_emulator
from flows.demo.embedded_postgres import EmbeddedPostgres
from flows.demo.local_prefect import (
    LocalPrefectServer,
    PrefectServerUnavailable,
    configured_prefect_api,
    standing_prefect_server,
    use_prefect_api,
)
from flows.demo.processes import free_port

# The parts and helpers that commands, tests and benchmarks reach through the stack's module.
__all__ = [
    "BigQueryEmulator",
    "BoundedReadSessions",
    "EmbeddedPostgres",
    "LocalPrefectServer",
    "LocalStack",
    "free_port",
    "local_stack",
    "standing_prefect_server",
]

log = logging.getLogger(__name__)


class Part(Protocol):
    started_here: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_ready(self) -> bool: ...


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
    prefect: LocalPrefectServer | None = None
    # Why this command runs on Prefect's ephemeral mode: the local Prefect server did not start.
    prefect_fallback: str | None = field(default=None, init=False)
    _started: list[Part] = field(default_factory=list)
    _lease: IO[bytes] | None = field(default=None, init=False)
    _api_set_here: bool = field(default=False, init=False)

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
        if configured_prefect_api() is None:
            home = os.environ.get("PREFECT_HOME") or str(s.state_dir / "prefect")
            self.prefect = LocalPrefectServer(
                home=Path(home).expanduser(),
                port=s.local_prefect_port,
                log_file=s.state_dir / "logs" / "prefect-server.log",
                startup_timeout_s=s.local_prefect_startup_timeout_s,
            )

    @property
    def _users_dir(self) -> Path:
        return self.settings.state_dir / "stack-users"

    def _parts(self) -> dict[str, Part]:
        named: dict[str, Part | None] = {
            "postgres": self.postgres,
            "bigquery-emulator": self.emulator,
            "prefect-server": self.prefect,
        }
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
                    try:
                        part.start()
                    except PrefectServerUnavailable as exc:
                        self.prefect_fallback = f"{exc}: this command uses Prefect's ephemeral mode"
                        self._record(f"{name} did not start; Prefect's ephemeral mode instead")
                        continue
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
        if self.prefect is not None and self.prefect_fallback is None and not self.keep_running:
            use_prefect_api(self.prefect.api_url)
            self._api_set_here = True

    def _stop_started(self) -> None:
        for name, part in reversed(self._parts().items()):
            if part in self._started:
                part.stop()
                self._record(f"stopped {name} (start-up failed)")
                self._marker(name).unlink(missing_ok=True)
        self._started.clear()

    def stop(self) -> None:
        """Leave the stack; the last command out stops the parts commands started."""
        if self._api_set_here:
            use_prefect_api(None)
            self._api_set_here = False
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
        return {name: "up" if part.is_ready() else "down" for name, part in self._parts().items()}

    def stop_all(self) -> None:
        """Stop every part even if another process started them (`refresh stack down`)."""
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
    """Start what is needed, yield, and stop what was started, also on SIGTERM. A Prefect
    server that did not start is said in one line on stderr (the command runs on Prefect's
    ephemeral mode)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM's default action skips `finally`: turn it into SystemExit so children stop.
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    stack = LocalStack(settings, throwaway=throwaway)
    try:
        stack.start()
        if stack.prefect_fallback:
            print(f"warning: {stack.prefect_fallback}", file=sys.stderr, flush=True)
        yield stack
    finally:
        stack.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run_emulator(sys.argv[1:])
