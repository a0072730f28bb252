"""The embedded stack: clear errors for taken ports, reuse of running parts (waited for while
they do not answer yet, never started twice), clean stop, and a password for every TCP
connection to the embedded Postgres."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.core.errors import StackError
from flows.core.settings import Settings
from flows.demo.local_stack import BigQueryEmulator, EmbeddedPostgres, free_port


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_taken_postgres_port_is_a_clear_error(tmp_path: Path) -> None:
    with _listening_socket() as s:
        port = s.getsockname()[1]
        pg = EmbeddedPostgres(tmp_path / "pg", port)
        with pytest.raises(StackError, match=f"port {port} is taken.*REFRESH_LOCAL_PG_PORT"):
            pg.start()
    assert not (tmp_path / "pg" / "PG_VERSION").exists()  # nothing initialised


def test_taken_emulator_port_is_a_clear_error(tmp_path: Path) -> None:
    with _listening_socket() as s:
        port = s.getsockname()[1]
        emu = BigQueryEmulator(
            rest_port=port, grpc_port=port + 1, data_dir=None, log_file=tmp_path / "emu.log"
        )
        with pytest.raises(StackError, match="REFRESH_LOCAL_BQ_REST_PORT"):
            emu.start()


def test_running_parts_are_reused_not_restarted(stack: object, settings: Settings) -> None:
    pg = EmbeddedPostgres(settings.pg_data_dir, settings.local_pg_port)
    assert pg.is_ready()
    pid = pg.running_pid()
    pg.start()  # already running: reused
    assert pg.running_pid() == pid and not pg.started_here


def test_postgres_start_stop_and_restart_keeps_data(tmp_path: Path) -> None:
    import psycopg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = EmbeddedPostgres(tmp_path / "pg", port)
    pg.start()
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("create table kept (x int)")
            c.execute("insert into kept values (42)")
        pg.stop()
        assert pg.running_pid() is None and not pg.is_ready()
        pg.start()
        with psycopg.connect(pg.dsn) as c:
            assert c.execute("select x from kept").fetchone() == (42,)
    finally:
        pg.stop()


def test_emulator_serves_storage_slices_larger_than_its_default_message_cap(tmp_path: Path) -> None:
    """60,000 SQP rows in one week: one Storage batch is far above the emulator's ~11 MB default."""
    from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
    from flows.engine.bigquery import make_clients
    from flows.engine.extract import ReadStats, read_storage

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    emu = BigQueryEmulator(
        rest_port=ports[0], grpc_port=ports[1], data_dir=None, log_file=tmp_path / "emu.log"
    )
    emu.start()
    try:
        s = Settings(local_bq_rest_port=ports[0], local_bq_grpc_port=ports[1], state_dir=tmp_path)
        clients = make_clients(s)
        generate(clients, SampleSpec(sqp_rows=60_000, weeks=1, asins=50, daily_rows=0))
        stats = ReadStats()
        rows = sum(b.num_rows for b in read_storage(clients, SQP_TABLE, "", stats))
        assert rows == stats.rows == 60_000
        clients.close()
    finally:
        emu.stop()


def test_a_command_never_stops_a_part_another_command_still_uses(tmp_path: Path) -> None:
    """The first command starts Postgres; the second reuses it; the first leaving stops
    nothing, the last one out stops what commands started."""
    from flows.core.settings import get_settings
    from flows.demo.local_stack import LocalStack, free_port

    settings = get_settings(state_dir=tmp_path, local_pg_port=free_port(), bq_project="not-the-emulator")
    first, second = LocalStack(settings), LocalStack(settings)
    first.start()
    try:
        assert first.postgres is not None and first.postgres.is_ready()
        second.start()
        first.stop()
        assert second.postgres is not None and second.postgres.is_ready(), "stopped under a user"
        second.stop()
        assert not second.postgres.is_ready(), "the last command out leaves it running"
    finally:
        LocalStack(settings).stop_all()


def test_parts_started_by_stack_up_outlive_every_command(tmp_path: Path) -> None:
    from flows.core.settings import get_settings
    from flows.demo.local_stack import LocalStack, free_port

    settings = get_settings(state_dir=tmp_path, local_pg_port=free_port(), bq_project="not-the-emulator")
    LocalStack(settings, keep_running=True).start()
    try:
        command = LocalStack(settings)
        command.start()
        command.stop()
        assert command.postgres is not None and command.postgres.is_ready()
    finally:
        LocalStack(settings).stop_all()


def test_the_emulators_we_start_bound_their_read_sessions(stack: object, settings: Settings) -> None:
    """Every path starts the emulator through BigQueryEmulator.start (the test session's stack
    too): `python -m flows.demo.local_stack`, which swaps in BoundedReadSessions."""
    emu = BigQueryEmulator(
        rest_port=settings.local_bq_rest_port,
        grpc_port=settings.local_bq_grpc_port,
        data_dir=None,
        log_file=settings.state_dir / "logs" / "bqemulator.log",
    )
    pid = int(emu.pid_file.read_text())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[1:4] == [b"-m", b"flows.demo.local_stack", b"start"], argv
    env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    assert env.get(b"SQP_EMULATOR_SESSION_CAP_MB") == b"256", "the test session's cap did not reach it"


def _psql() -> str:
    from pgserver._commands import POSTGRES_BIN_PATH

    return shutil.which("psql") or str(POSTGRES_BIN_PATH / "psql")


def _without_password(port: int) -> str:
    """The embedded server's address with no password from anywhere (no passfile, no env)."""
    return f"postgresql://postgres@127.0.0.1:{port}/postgres?passfile=/nonexistent&connect_timeout=5"


def _started(tmp_path: Path) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(tmp_path / "pg", free_port())
    pg.start()
    return pg


def test_embedded_postgres_wants_its_password_over_tcp(tmp_path: Path) -> None:
    import psycopg

    pg = _started(tmp_path)
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(_without_password(pg.port)).close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(_without_password(pg.port), password="guessed").close()
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("select current_user").fetchone() == ("postgres",)
        assert stat.S_IMODE(pg.passfile.stat().st_mode) == 0o600
        password = pg.passfile.read_text().strip().rsplit(":", 1)[1]
        assert len(password) >= 24 and password not in pg.dsn
        # The README's way in: one psql command with the DSN `refresh stack up` prints.
        psql = subprocess.run(
            [_psql(), pg.dsn, "-Atc", "select 40 + 2"], capture_output=True, text=True, timeout=30
        )
        assert psql.stdout.strip() == "42", psql.stderr
    finally:
        pg.stop()


def _make_it_trusting_as_before(pg: EmbeddedPostgres) -> None:
    """A data directory as earlier versions left it: trust for every local connection, no
    password on the role, no passfile."""
    import psycopg

    (pg.data_dir / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    with psycopg.connect(host=str(pg.data_dir), port=pg.port, user="postgres", autocommit=True) as conn:
        conn.execute("alter role postgres password null")
        conn.execute("select pg_reload_conf()")
    pg.passfile.unlink()


def test_a_trusting_data_directory_is_upgraded_on_the_next_start(tmp_path: Path) -> None:
    import psycopg

    pg = _started(tmp_path)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("create table kept (x int); insert into kept values (7)")
        # Stopped, then started again by the new code (`make run` on an old state dir).
        _make_it_trusting_as_before(pg)
        psycopg.connect(_without_password(pg.port)).close()  # anyone gets in, as before
        pg.stop()
        pg.start()
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(_without_password(pg.port)).close()
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("select x from kept").fetchone() == (7,), "the data stays"
        # Still running from before (`refresh stack up` on an old server): upgraded in place.
        _make_it_trusting_as_before(pg)
        again = EmbeddedPostgres(pg.data_dir, pg.port)
        again.start()
        assert not again.started_here
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(_without_password(pg.port)).close()
        with psycopg.connect(again.dsn) as conn:
            assert conn.execute("select x from kept").fetchone() == (7,)
    finally:
        pg.stop()


def test_the_test_stack_wants_the_password_too(stack: object, settings: Settings) -> None:
    import psycopg

    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(_without_password(settings.local_pg_port)).close()
    with psycopg.connect(settings.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@contextlib.contextmanager
def _stopped_for(pid: int, seconds: float) -> Iterator[None]:
    """The process frozen (SIGSTOP) for `seconds`, as a part too busy to answer on a loaded
    machine: its pid runs, its ports are bound, readiness checks time out."""
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        os.kill(pid, signal.SIGCONT)


def test_an_emulator_too_busy_to_answer_is_waited_for_not_started_again(
    tmp_path: Path, settings: Settings
) -> None:
    """A command that finds the emulator's process running but not answering waits for it: no
    second emulator on the same ports and data, no 'port taken', and no start recorded (a
    command that did not start a part must not stop it as the last one out)."""
    from flows.core.settings import get_settings
    from flows.demo.local_stack import LocalStack

    own = get_settings(
        state_dir=tmp_path,
        pg_dsn=settings.dsn(),  # the session's Postgres: only the emulator is embedded here
        local_bq_rest_port=free_port(),
        local_bq_grpc_port=free_port(),
    )
    first, second = LocalStack(own), LocalStack(own)
    first.start()
    try:
        assert first.emulator is not None and second.emulator is not None
        assert first.emulator.process is not None
        pid = first.emulator.process.pid
        t0 = time.monotonic()
        with _stopped_for(pid, 4):
            second.start()
        assert time.monotonic() - t0 >= 3.5, "it did not wait for the emulator"
        assert second.emulator.is_ready() and second.emulator.process is None
        assert int(second.emulator.pid_file.read_text()) == pid
        starts = [e for e in (tmp_path / "logs" / "stack.log").read_text().splitlines() if " started " in e]
        assert len(starts) == 1 and f"pid {os.getpid()} " in starts[0], starts
        second.stop()
        assert first.emulator.is_ready(), "the command that reused it stopped it"
    finally:
        first.stop()
        LocalStack(own).stop_all()
    assert first.emulator.process is not None and first.emulator.process.poll() is not None, (
        "the last command out left it running"
    )


def test_an_emulator_still_starting_is_waited_for_not_started_twice(tmp_path: Path) -> None:
    """Two starts on the same ports and data, the second while the first emulator's process
    runs but does not answer yet: one emulator process, both ready."""
    rest, grpc = free_port(), free_port()

    def emulator() -> BigQueryEmulator:
        return BigQueryEmulator(
            rest_port=rest, grpc_port=grpc, data_dir=tmp_path / "bq", log_file=tmp_path / "logs" / "emu.log"
        )

    first, second = emulator(), emulator()
    errors: list[BaseException] = []

    def start_first() -> None:
        try:
            first.start()
        except BaseException as exc:
            errors.append(exc)

    starting = threading.Thread(target=start_first)
    starting.start()
    try:
        deadline = time.monotonic() + 60
        while not first.pid_file.exists():
            assert starting.is_alive() and time.monotonic() < deadline, errors
            time.sleep(0.02)
        assert not first.is_ready(), "it answered already: nothing was measured"
        second.start()
        starting.join(timeout=120)
        assert not errors, errors
        assert first.process is not None and second.process is None, "a second emulator started"
        assert first.is_ready() and int(first.pid_file.read_text()) == first.process.pid
    finally:
        starting.join(timeout=120)
        first.stop()


def test_a_running_postgres_too_busy_to_answer_is_waited_for(tmp_path: Path) -> None:
    """The postmaster runs but answers no connection for longer than one readiness check (and
    the password check) takes: the next start waits for it instead of failing; a server that
    runs on another port is a clear error at once."""
    pg = _started(tmp_path)
    try:
        pid = pg.running_pid()
        assert pid is not None
        again = EmbeddedPostgres(pg.data_dir, pg.port)
        t0 = time.monotonic()
        with _stopped_for(pid, 9):
            again.start()
        assert time.monotonic() - t0 >= 8.5, "it did not wait for the server"
        assert not again.started_here and again.running_pid() == pid and again.is_ready()
        elsewhere = free_port()
        with pytest.raises(StackError, match=f"on port {pg.port}, not {elsewhere}"):
            EmbeddedPostgres(pg.data_dir, elsewhere).start()
    finally:
        pg.stop()
