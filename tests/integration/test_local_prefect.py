"""The Prefect server as a part of the embedded stack: started and stopped under the stack's lease
rules, left out when the user configured a Prefect API, Prefect's ephemeral mode (said in one
line) when it cannot start, and a clear error for a taken port. Real `prefect server start`s."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.core.errors import StackError
from flows.core.settings import Settings, get_settings
from flows.demo.local_stack import LocalStack, free_port, local_stack


@pytest.fixture
def no_prefect_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No Prefect API configured, as on a user's machine (the session's server set aside), and
    the Prefect home under the test's state directory, as `refresh` sets it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield
    os.environ.pop("PREFECT_API_URL", None)  # monkeypatch restores the session's


def _only_prefect(tmp_path: Path, session: Settings, **overrides: object) -> Settings:
    """A state directory of its own whose only embedded part is the Prefect server."""
    return get_settings(
        state_dir=tmp_path,
        pg_dsn=session.dsn(),
        bq_project="not-the-emulator",
        local_prefect_port=free_port(),
        **overrides,
    )


def test_prefect_server_follows_the_stacks_lease_rules(
    tmp_path: Path, settings: Settings, no_prefect_api: None
) -> None:
    own = _only_prefect(tmp_path, settings)
    first, second = LocalStack(own), LocalStack(own)
    assert first.prefect is not None and second.prefect is not None
    first.start()
    try:
        assert first.prefect.started_here and first.prefect.is_ready()
        assert first.status() == {"prefect-server": "up"}
        assert os.environ["PREFECT_API_URL"] == own.local_prefect_api, "commands do not report to it"
        assert (tmp_path / "prefect" / "prefect.db").exists(), "its SQLite is not under the state dir"
        second.start()
        assert not second.prefect.started_here, "a second server was started"
        first.stop()
        assert second.prefect.is_ready(), "stopped under a command that uses it"
        second.stop()
        assert not second.prefect.is_ready(), "the last command out left it running"
        assert "PREFECT_API_URL" not in os.environ, "a stopped server stays this process's API"
        # `refresh stack up`: it outlives every command until `refresh stack down`.
        LocalStack(own, keep_running=True).start()
        command = LocalStack(own)
        command.start()
        command.stop()
        assert command.prefect is not None and command.prefect.is_ready()
    finally:
        LocalStack(own).stop_all()
    assert not LocalStack(own).prefect.is_ready()  # type: ignore[union-attr]
    log = (tmp_path / "logs" / "stack.log").read_text()
    assert log.count("started prefect-server") == 2 and "stopped prefect-server (stack down)" in log


def test_a_configured_prefect_api_wins(tmp_path: Path, settings: Settings, prefect_api: str) -> None:
    own = _only_prefect(tmp_path, settings)
    stack = LocalStack(own)
    assert stack.prefect is None and stack.status() == {}
    stack.start()
    try:
        assert os.environ["PREFECT_API_URL"] == prefect_api
        assert not (tmp_path / "logs" / "prefect-server.log").exists(), "a Prefect server was started"
    finally:
        stack.stop()
    assert os.environ["PREFECT_API_URL"] == prefect_api


def test_a_prefect_server_that_cannot_start_falls_back_to_ephemeral_in_one_line(
    tmp_path: Path, settings: Settings, no_prefect_api: None, capfd: pytest.CaptureFixture[str]
) -> None:
    own = _only_prefect(tmp_path, settings, local_prefect_startup_timeout_s=0.3)
    with local_stack(own) as stack:
        assert stack.prefect is not None and stack.prefect_fallback is not None
        assert "PREFECT_API_URL" not in os.environ
        assert stack.prefect.running_pid() is None and not stack.prefect.is_ready(), "it was left running"
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "Prefect" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: the Prefect server did not answer") and "ephemeral mode" in lines[0]
    assert str(tmp_path / "logs" / "prefect-server.log") in lines[0]


def test_a_taken_prefect_port_is_a_clear_one_line_error(
    tmp_path: Path, settings: Settings, no_prefect_api: None
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        own = _only_prefect(tmp_path, settings)
        own = own.model_copy(update={"local_prefect_port": port})
        stack = LocalStack(own)
        with pytest.raises(StackError) as caught:
            stack.start()
    message = str(caught.value)
    assert "\n" not in message
    assert f"port {port} for the Prefect server is taken" in message
    assert "REFRESH_LOCAL_PREFECT_PORT" in message
    assert "PREFECT_API_URL" not in os.environ
