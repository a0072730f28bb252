"""The retry policy (flows.core.retry): what is retried, how long it waits, when it gives up."""

from __future__ import annotations

import time
from uuid import uuid4

import psycopg
import pytest

from flows.core import retry
from flows.core.errors import TerminalError, TransientError


def test_the_policies_backoffs() -> None:
    assert retry.SLICE.delays() == [2, 4, 8]
    assert retry.TABLE.delays() == [30, 120]
    assert [retry.RUN_END.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 10, 10, 10]
    with pytest.raises(ValueError, match="unbounded"):
        _ = retry.RUN_END.retries


def test_transient_is_ours_a_lost_connection_or_a_concurrency_abort() -> None:
    assert retry.is_transient(TransientError("503"))
    assert retry.is_transient(psycopg.OperationalError("connection lost"))
    assert retry.is_transient(psycopg.errors.SerializationFailure("abort"))
    assert retry.is_transient(psycopg.errors.DeadlockDetected("deadlock"))
    assert not retry.is_transient(psycopg.errors.InsufficientPrivilege("read-only"))
    assert not retry.is_transient(TerminalError("fix it"))
    assert not retry.is_transient(KeyError("a bug"))


def test_no_retry_after_the_attempts_or_past_the_deadline() -> None:
    b = retry.Backoff(first_s=10.0, attempts=3)
    now = time.monotonic()
    assert b.may_retry(1, None) and b.may_retry(2, None) and not b.may_retry(3, None)
    assert b.may_retry(1, now + 60)  # waits 10 s
    assert not b.may_retry(2, now + 15)  # would wait 20 s, past the deadline
    assert retry.RUN_END.may_retry(1000, now + 60)  # unbounded: only the deadline stops it


def test_call_retries_transient_failures_and_counts_them() -> None:
    count = retry.start_counting()
    fails = [psycopg.OperationalError("reset"), TransientError("503")]

    def flaky() -> str:
        if fails:
            raise fails.pop(0)
        return "done"

    assert retry.call(flaky, "t slice 1", retry.Backoff(first_s=0.01, attempts=4)) == "done"
    assert count.n == 2


def test_call_gives_up_after_its_attempts_naming_what_failed() -> None:
    count = retry.start_counting()
    calls = []

    def down() -> None:
        calls.append(1)
        raise psycopg.OperationalError("connection refused\nIs the server running?")

    with pytest.raises(
        TransientError, match=r"t slice 1: still failing after 3 attempt\(s\) in 0s: connection refused$"
    ) as info:
        retry.call(down, "t slice 1", retry.Backoff(first_s=0.01, attempts=3))
    assert len(calls) == 3 and count.n == 2
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


def test_call_starts_no_retry_past_the_deadline() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise TransientError("503")

    t0 = time.monotonic()
    with pytest.raises(TransientError, match="still failing after 2 attempt"):
        retry.call(down, "t", retry.Backoff(first_s=0.2), deadline=t0 + 0.5)  # waits 0.2, then 0.4
    assert len(calls) == 2 and time.monotonic() - t0 < 0.5


def test_call_does_not_retry_a_permanent_failure() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise psycopg.errors.InsufficientPrivilege("permission denied")

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        retry.call(refused, "t", retry.Backoff(first_s=0.01, attempts=4))
    assert len(calls) == 1


def test_a_tables_budget_is_kept_across_its_whole_retries_until_it_is_done() -> None:
    budgets = retry.TableBudgets()
    run = uuid4()
    first = budgets.deadline(run, "t", 300.0)
    assert 299 < first - time.monotonic() <= 300
    time.sleep(0.01)
    assert budgets.deadline(run, "t", 300.0) == first
    assert budgets.deadline(run, "other", 300.0) > first
    budgets.done(run, "t")
    assert budgets.deadline(run, "t", 300.0) > first
