"""Pure rules of the API: freshness against a table's frequency, overall health, scopes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows.api.problems import _field
from flows.control.monitoring import Freshness, Health, freshness, health
from flows.control.tokens import Scope, TokenInfo, parse_scopes
from flows.core.errors import ConfigError

NOW = datetime(2026, 11, 29, 6, tzinfo=UTC)


@pytest.mark.parametrize(
    ("age_h", "expected"),
    [(0, "fresh"), (24, "fresh"), (24.01, "aging"), (48, "aging"), (48.01, "stale"), (None, "never")],
)
def test_freshness_against_the_frequency(age_h: float | None, expected: str) -> None:
    last = None if age_h is None else NOW - timedelta(hours=age_h)
    assert freshness(last, 24, NOW) == Freshness(expected)


def table(name: str, fresh: str, last_status: str = "success", monitored: bool = True) -> dict[str, Any]:
    return {"table": name, "freshness": fresh, "last_status": last_status, "monitored": monitored}


def run(status: str) -> dict[str, Any]:
    return {"run_id": f"r-{status}", "status": status}


def test_health_rule() -> None:
    assert health([table("a", "fresh")], [run("success")]) == (Health.HEALTHY, [])
    # a table that writes nothing (dry_run, disabled) cannot be late
    assert health([table("a", "fresh"), table("b", "never", None, monitored=False)], [])[0] is Health.HEALTHY
    assert health([table("a", "aging")], [run("success")])[0] is Health.DEGRADED
    assert health([table("a", "fresh", "failed")], [run("success")])[0] is Health.DEGRADED
    assert health([table("a", "fresh")], [run("success"), run("failed")])[0] is Health.DEGRADED
    assert health([table("a", "fresh")], [run("warning")])[0] is Health.DEGRADED
    assert health([table("a", "stale")], [run("success")])[0] is Health.FAILING
    assert health([table("a", "never", None)], [])[0] is Health.FAILING
    state, reasons = health([table("a", "fresh")], [run("running"), run("abandoned"), run("success")])
    assert state is Health.FAILING and "abandoned" in reasons[0]


def test_scopes_imply_less_powerful_ones() -> None:
    def token(*scopes: Scope) -> TokenInfo:
        return TokenInfo("id", "n", scopes, NOW)

    assert token(Scope.READ).allows(Scope.READ) and not token(Scope.READ).allows(Scope.TRIGGER)
    assert token(Scope.TRIGGER).allows(Scope.READ) and not token(Scope.TRIGGER).allows(Scope.ADMIN)
    assert all(token(Scope.ADMIN).allows(s) for s in Scope)
    assert parse_scopes(["read", "read", "admin"]) == (Scope.READ, Scope.ADMIN)
    with pytest.raises(ConfigError, match="unknown scope"):
        parse_scopes(["root"])
    with pytest.raises(ConfigError):
        parse_scopes([])


def test_problem_field_names() -> None:
    assert _field(("body", "tables", 0)) == "tables[0]"
    assert _field(("query", "hours")) == "hours"
    assert _field(("header", "Idempotency-Key")) == "Idempotency-Key"
    assert _field(("body",)) == "body"
