"""The status cache: per key, bounded in age and size, one computation for concurrent misses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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
    assert cache.get(24, compute).body == b"3"


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
