"""The retry policy of a refresh: what is transient, the backoff, one budget per table, the count.

Every retry of a run's own work goes through here:
- a slice attempt (flows.engine.slice_loader): `SLICE`, after 2, 4 and 8 s (4 attempts);
- a table as a whole, when its slices still fail (the flow's Prefect task retries,
  flows.orchestration.daily_refresh): `TABLE`, after 30 and 120 s, its committed slices kept;
- the run's end row while Postgres restarts (daily_refresh): `RUN_END`, 1, 2, 4, 8, 10, 10 ...
  s for REFRESH_PG_RETRY_BUDGET_S.
Slice and table retries share one budget per table, REFRESH_TABLE_RETRY_BUDGET_S counted from
the table's first attempt (`TableBudgets`): no retry starts after it.

Two retries are other policies with their own specs, so they are not built from this one:
- the BigQuery client's request retries (flows.engine.bigquery): google-api-core's `Retry`
  with the library's own list of retryable API errors, each call bounded by
  REFRESH_BQ_TIMEOUT_S. They retry inside one attempt, which this policy then retries as a
  whole; they count in the table's retries (`bump` is their `on_error`).
- webhook delivery (flows.notify): the Standard Webhooks schedule (5 s to hours, with jitter)
  for a receiver that is down. Deliveries leave through the outbox, after the run, so a
  receiver's outage is no transient failure of the run and spends no table's budget.

The count: `start_counting()` opens a counter for the table refreshed in this thread (a
context variable: each task thread has its own); `bump()` adds one retry. A slice run on a Dask
worker counts in the worker and hands its count back with its result (`add`). The audit
writes are flows.control.retries.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import psycopg

from flows.core.errors import TransientError, one_line

log = logging.getLogger(__name__)
T = TypeVar("T")

# What may succeed when tried again: our own transient errors (BigQuery's rate limits, 5xx,
# timeouts and resets, as flows.engine.bigquery.classify names them; a lost Dask worker), a lost
# Postgres connection, and a transaction Postgres aborted for concurrency. Anything else (a
# refusal, bad data, a bug) fails at once.
TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError,
    psycopg.OperationalError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: the n-th retry waits first_s * factor**(n-1), at most max_s."""

    first_s: float
    factor: float = 2.0
    max_s: float = math.inf
    # Attempts in all, the first one included; None: as many as the deadline allows.
    attempts: int | None = None

    def delay(self, retry: int) -> float:
        return min(self.first_s * self.factor ** (retry - 1), self.max_s)

    @property
    def retries(self) -> int:
        if self.attempts is None:
            raise ValueError("an unbounded backoff has no number of retries")
        return self.attempts - 1

    def delays(self) -> list[float]:
        return [self.delay(n) for n in range(1, self.retries + 1)]

    def may_retry(self, failed_attempts: int, deadline: float | None) -> bool:
        """Whether another attempt starts after `failed_attempts`: within the attempts, and its
        wait ends by `deadline` (time.monotonic()), so no retry starts after the budget."""
        if self.attempts is not None and failed_attempts >= self.attempts:
            return False
        return deadline is None or time.monotonic() + self.delay(failed_attempts) <= deadline


SLICE = Backoff(first_s=2.0, attempts=4)
TABLE = Backoff(first_s=30.0, factor=4.0, attempts=3)
RUN_END = Backoff(first_s=1.0, max_s=10.0)


def call(fn: Callable[[], T], what: str, backoff: Backoff, deadline: float | None = None) -> T:
    """fn(), its transient failures retried with `backoff` until `deadline` (time.monotonic()).

    Each retry is logged and counted (`bump`). Giving up raises TransientError naming `what`,
    the attempts and the time taken, from the last failure.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except TRANSIENT as exc:
            if not backoff.may_retry(attempt, deadline):
                raise TransientError(
                    f"{what}: still failing after {attempt} attempt(s) in "
                    f"{time.monotonic() - started:.0f}s: {one_line(exc)}"
                ) from exc
            delay = backoff.delay(attempt)
            of = f"/{backoff.retries}" if backoff.attempts is not None else ""
            log.warning(
                "%s: transient failure (%s), retry %d%s in %.0fs", what, one_line(exc), attempt, of, delay
            )
            bump()
            time.sleep(delay)


class TableBudgets:
    """The retry deadline of each table of a run in this process, set when its first attempt
    starts and kept across its whole-table retries (REFRESH_TABLE_RETRY_BUDGET_S)."""

    def __init__(self) -> None:
        self._deadlines: dict[tuple[UUID, str], float] = {}
        self._lock = threading.Lock()

    def deadline(self, run_id: UUID, table: str, budget_s: float) -> float:
        with self._lock:
            return self._deadlines.setdefault((run_id, table), time.monotonic() + budget_s)

    def done(self, run_id: UUID, table: str) -> None:
        with self._lock:
            self._deadlines.pop((run_id, table), None)


@dataclass
class RetryCount:
    n: int = 0


_current: contextvars.ContextVar[RetryCount | None] = contextvars.ContextVar("retry_count", default=None)


def start_counting() -> RetryCount:
    count = RetryCount()
    _current.set(count)
    return count


def bump(_exc: BaseException | None = None) -> None:
    add(1)


def add(n: int) -> None:
    """Adds `n` retries made elsewhere (a slice's on a Dask worker, flows.engine.scale_out)."""
    count = _current.get()
    if count is not None:
        count.n += n
