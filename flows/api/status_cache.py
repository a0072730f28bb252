"""A short cache of the status answer, per `hours`: under many concurrent readers (a wall of
dashboards, monitoring probes) one computation per window serves them all.

Stale while revalidating: an answer older than `ttl_s` is still served (for at most
`ttl_s + STALE_LIMIT_S`) while one background thread computes the next, so no reader waits for
the database when the window rolls over (before this, every reader of the worker queued
behind the recomputation once per window: the API's p99). A reader waits only when there is
no usable answer: the first request, after `clear()` (this process started a refresh or
changed the registry), or when the last recomputation failed (the error then reaches that
reader). Bounded in size. The response's Age header says how old the answer is (`generated_at`
in the body says when it was computed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_ENTRIES = 32
# How long past its ttl an answer may still be served while the next one is computed.
STALE_LIMIT_S = 10.0

log = logging.getLogger(__name__)


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
        self._refreshing: set[int] = set()
        # Bumped by clear(): a background computation begun before it does not store its answer.
        self._generation = 0

    def lookup(self, hours: int, compute: Callable[[], bytes]) -> Cached | None:
        """A usable answer without waiting: a fresh one, or a stale one while a background
        thread computes the next. None when the caller must compute (`get`)."""
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(hours)
        if entry is None:
            return None
        age = entry.age_s()
        if age < self.ttl_s:
            return entry
        if age >= self.ttl_s + STALE_LIMIT_S:
            return None
        self._refresh_in_background(hours, compute)
        return entry

    def get(self, hours: int, compute: Callable[[], bytes]) -> Cached:
        """An answer, computing it (once for concurrent callers) when there is no usable one."""
        if self.ttl_s <= 0:
            return Cached(compute(), time.monotonic())
        hit = self.lookup(hours, compute)
        if hit is not None:
            return hit
        with self._lock:
            hit = self.lookup(hours, compute)
            if hit is not None:
                return hit
            entry = Cached(compute(), time.monotonic())
            self._store(hours, entry)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def _store(self, hours: int, entry: Cached) -> None:
        if hours not in self._entries and len(self._entries) >= MAX_ENTRIES:
            self._entries.pop(min(self._entries, key=lambda k: self._entries[k].computed_at))
        self._entries[hours] = entry

    def _refresh_in_background(self, hours: int, compute: Callable[[], bytes]) -> None:
        with self._lock:
            if hours in self._refreshing:
                return
            self._refreshing.add(hours)
            generation = self._generation

        def run() -> None:
            entry: Cached | None = None
            try:
                entry = Cached(compute(), time.monotonic())
            except Exception:
                # The next reader computes it itself and gets the error.
                log.exception("recomputing the status answer failed")
            with self._lock:
                self._refreshing.discard(hours)
                if self._generation != generation:
                    return
                if entry is None:
                    self._entries.pop(hours, None)
                else:
                    self._store(hours, entry)

        threading.Thread(target=run, name=f"status-cache-{hours}", daemon=True).start()
