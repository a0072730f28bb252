"""The emulator's read sessions are bounded (flows.demo.local_stack.BoundedReadSessions)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flows.demo.local_stack import BoundedReadSessions


@dataclass
class _Table:
    nbytes: int


@dataclass
class _Session:
    table: _Table


def test_idle_sessions_beyond_the_cap_are_dropped_least_recently_used_first() -> None:
    sessions = BoundedReadSessions(cap_bytes=250, ttl_s=3600, min_idle_s=0)
    for name in ("a", "b", "c"):
        sessions[name] = _Session(_Table(100))
    assert list(sessions) == ["b", "c"]  # 300 > 250: the oldest went
    sessions.get("b")  # read again: now the most recently used
    sessions["d"] = _Session(_Table(100))
    assert list(sessions) == ["b", "d"]


def test_sessions_in_use_stay_under_the_cap_and_expired_ones_go() -> None:
    busy = BoundedReadSessions(cap_bytes=10, ttl_s=3600, min_idle_s=60)
    busy["a"] = _Session(_Table(100))
    busy["b"] = _Session(_Table(100))
    assert list(busy) == ["a", "b"]  # both used within the last minute: kept
    expiring = BoundedReadSessions(cap_bytes=10**9, ttl_s=0.05, min_idle_s=60)
    expiring["old"] = _Session(_Table(1))
    time.sleep(0.1)
    expiring["new"] = _Session(_Table(1))
    assert list(expiring) == ["new"]


def test_sessions_created_and_read_from_many_threads_at_once() -> None:
    """The emulator serves read sessions from several gRPC threads: creating, reading and
    evicting at once must never fail (an unguarded OrderedDict raised "mutated during
    iteration" in a refresh)."""
    import sys
    import threading

    sessions = BoundedReadSessions(cap_bytes=5_000, ttl_s=3600, min_idle_s=0)
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible

    def work(tid: int) -> None:
        try:
            for i in range(3_000):
                sessions[f"{tid}-{i}"] = _Session(_Table(100))
                sessions.get(f"{tid}-{i - 1}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert sum(s.table.nbytes for s in sessions.values()) <= 5_000
