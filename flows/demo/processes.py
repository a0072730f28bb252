"""Ports and processes of the embedded parts: free ports, pid files, readiness waits, stopping."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from flows.core.errors import StackError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (tests, benchmarks, throwaway servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def await_ready(is_ready: Callable[[], bool], alive: Callable[[], bool], timeout_s: float, late: str) -> bool:
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


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pid_from_file(pid_file: Path, launchers: tuple[bytes, ...], port: int) -> int | None:
    """The process `pid_file` names, if it still runs as one of ours on `port`: its command line
    holds one of `launchers` and the port (a pid the system gave to another program since does
    not count, where /proc tells)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid  # no /proc (macOS): alive is all we can tell
    launcher = any(name in a for a in argv for name in launchers)
    ours = launcher and str(port).encode() in argv
    return pid if ours else None


def stop_group(pid: int, process: subprocess.Popen[bytes] | None, grace_s: float = 15) -> None:
    """SIGTERM to the process group `pid` leads (a part started in a session of its own), SIGKILL
    after `grace_s`; `process` (when this process started it) is reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
