"""The status cache: per key, bounded in age and size, one computation for concurrent misses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from flows.api import status_cache
from flows.api.status_cache import MAX_ENTRIES, StatusCache


def counter() -> tuple[list[int], Callable[[], bytes]]:
    calls: list[int] = []

    def compute() -> bytes:
        calls.append(1)
        return str(len(calls)).encode()

    return calls, compute


def test_served_again_within_ttl_then_recomputed() -> None:
    cache = StatusCache(ttl_s=0.2)
    calls, compute = counter()
    first = cache.get(24, compute)
    again = cache.get(24, compute)
    assert again is first and len(calls) == 1
    assert 0 <= again.age_s() < 0.2
    assert cache.get(48, compute).body == b"2"  # another key: its own answer
    time.sleep(0.25)
    # Expired: the old answer at once, the next one computed in the background.
    assert cache.get(24, compute) is first
    wait_for(lambda: cache.get(24, compute).body == b"3")
    assert len(calls) == 3


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_readers_do_not_wait_for_the_recomputation() -> None:
    cache = StatusCache(ttl_s=0.05)
    release = threading.Event()
    calls: list[int] = []

    def slow() -> bytes:
        calls.append(1)
        if len(calls) > 1:
            release.wait(5)
        return str(len(calls)).encode()

    first = cache.get(24, slow)
    time.sleep(0.06)
    t0 = time.monotonic()
    served = [cache.get(24, slow) for _ in range(50)]
    assert time.monotonic() - t0 < 0.5  # none waited for the blocked computation
    assert all(s is first for s in served) and len(calls) == 2  # one background computation
    release.set()
    wait_for(lambda: cache.get(24, slow).body == b"2")


def test_too_stale_or_failed_answers_are_not_served(monkeypatch: Any) -> None:
    monkeypatch.setattr(status_cache, "STALE_LIMIT_S", 0.1)
    cache = StatusCache(ttl_s=0.05)
    _, compute = counter()
    cache.get(24, compute)
    time.sleep(0.2)  # past ttl + stale limit: computed while the reader waits
    assert cache.get(24, compute).body == b"2"

    def boom() -> bytes:
        raise RuntimeError("database down")

    time.sleep(0.06)
    assert cache.get(24, boom).body == b"2"  # stale, and the background computation fails
    wait_for(lambda: 24 not in cache._entries)
    with pytest.raises(RuntimeError, match="database down"):
        cache.get(24, boom)  # the reader now sees the error, not an ever older answer


def test_a_computation_begun_before_clear_is_not_stored() -> None:
    cache = StatusCache(ttl_s=0.05)
    release = threading.Event()

    def old_answer() -> bytes:
        release.wait(5)
        return b"before"

    cache.get(24, lambda: b"first")
    time.sleep(0.06)
    cache.get(24, old_answer)  # starts the background computation
    cache.clear()  # e.g. the registry changed
    release.set()
    assert cache.get(24, lambda: b"after").body == b"after"
    time.sleep(0.05)
    assert cache.get(24, lambda: b"again").body == b"after"


def test_ttl_zero_computes_every_time_and_clear_forgets() -> None:
    calls, compute = counter()
    off = StatusCache(ttl_s=0)
    off.get(1, compute)
    off.get(1, compute)
    assert len(calls) == 2
    on = StatusCache(ttl_s=60)
    on.get(1, compute)
    on.clear()
    on.get(1, compute)
    assert len(calls) == 4


def test_bounded_in_size() -> None:
    cache = StatusCache(ttl_s=60)
    _, compute = counter()
    for hours in range(1, 3 * MAX_ENTRIES):
        cache.get(hours, compute)
    assert len(cache._entries) == MAX_ENTRIES
    assert 1 not in cache._entries and 3 * MAX_ENTRIES - 1 in cache._entries


def test_concurrent_misses_compute_once() -> None:
    cache = StatusCache(ttl_s=60)
    calls: list[int] = []

    def slow() -> bytes:
        calls.append(1)
        time.sleep(0.1)
        return b"x"

    start = threading.Barrier(8)

    def reader() -> None:
        start.wait()
        assert cache.get(24, slow).body == b"x"

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
