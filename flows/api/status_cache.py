"""A short cache of the status answer, per `hours`: under many concurrent readers (a wall of
dashboards, monitoring probes) one request per window computes it and the others get the same
bytes. Bounded in age (`ttl_s`) and size; cleared when this process starts a refresh or changes
the registry. The response's Age header says how old the answer is (`generated_at` in the body
says when it was computed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_ENTRIES = 32


@dataclass(frozen=True)
class Cached:
    body: bytes
    computed_at: float  # time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self.computed_at


class StatusCache:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[int, Cached] = {}
        # One computation per key at a time: concurrent misses wait for it instead of all
        # querying the database at once.
        self._lock = threading.Lock()

    def get(self, hours: int, compute: Callable[[], bytes]) -> Cached:
        if self.ttl_s <= 0:
            return Cached(compute(), time.monotonic())
        hit = self._fresh(hours)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._fresh(hours)
            if hit is not None:
                return hit
            entry = Cached(compute(), time.monotonic())
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.pop(min(self._entries, key=lambda k: self._entries[k].computed_at))
            self._entries[hours] = entry
            return entry

    def clear(self) -> None:
        self._entries.clear()

    def _fresh(self, hours: int) -> Cached | None:
        entry = self._entries.get(hours)
        return entry if entry is not None and entry.age_s() < self.ttl_s else None
