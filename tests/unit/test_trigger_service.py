"""The trigger service's checks before anything starts, and how the API answers each refusal."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from flows.api.routes import _refusal
from flows.control.tokens import Scope, TokenInfo
from flows.core.settings import Settings
from flows.core.table_config import TableConfig
from flows.orchestration import run_params
from flows.orchestration import trigger as service

TODAY = date(2026, 11, 28)


def cfg(name: str, **kw: Any) -> TableConfig:
    base = {"table_name": name, "source_table": name, "cursor_column": "d", "slice_size": "day"}
    return TableConfig(**{**base, **kw})


def token(*scopes: Scope) -> TokenInfo:
    return TokenInfo("id", "ci", scopes, datetime(2026, 1, 1, tzinfo=UTC))


def params(start: date | None = None) -> run_params.RunParams:
    return run_params.validate_params(None, start, TODAY if start else None, trigger="api", today=TODAY)


def test_a_disabled_table_needs_an_admin_token() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    chosen = [cfg("a"), cfg("b", enabled=False)]
    with pytest.raises(service.NeedsAdmin, match=r"b are disabled.*token 'ci' has trigger"):
        service.check_scope_and_size(settings, token(Scope.TRIGGER), params(), chosen, TODAY)
    service.check_scope_and_size(settings, token(Scope.ADMIN), params(), chosen, TODAY)


def test_a_backfill_past_the_slice_limit_is_refused_naming_the_count() -> None:
    settings = Settings(_env_file=None, api_max_slices=10)  # type: ignore[call-arg]
    backfill = params(date(2026, 11, 1))  # 28 daily slices
    with pytest.raises(
        service.TooManySlices, match=r"28 slices \(a 28\), more than REFRESH_API_MAX_SLICES \(10\)"
    ):
        service.check_scope_and_size(settings, token(Scope.ADMIN), backfill, [cfg("a")], TODAY)
    service.check_scope_and_size(settings, token(Scope.ADMIN), params(date(2026, 11, 20)), [cfg("a")], TODAY)


def test_the_same_request_hashes_the_same_and_another_differently() -> None:
    assert service.request_hash(params()) == service.request_hash(params())
    assert service.request_hash(params()) != service.request_hash(params(date(2026, 11, 20)))


@pytest.mark.parametrize(
    ("refusal", "status", "extra"),
    [
        (
            service.KeyReused("used"),
            422,
            {"errors": [{"field": "Idempotency-Key", "problem": "reused with a different body"}]},
        ),
        (service.NeedsAdmin("admin"), 403, {}),
        (
            service.TooManySlices("many", 10),
            422,
            {"errors": [{"field": "start_date", "problem": "more than 10 slices"}]},
        ),
        (
            service.RefreshBusy("busy", {"run_id": None, "trigger_id": "t"}),
            409,
            {"extra": {"run_id": None, "trigger_id": "t"}},
        ),
        (
            service.TooSoon("soon", 42),
            429,
            {"headers": {"Retry-After": "42"}, "extra": {"retry_after_s": 42}},
        ),
        (service.LaunchUnavailable("no deployment"), 503, {}),
    ],
)
def test_each_refusal_is_the_problem_the_api_documents(
    refusal: service.TriggerRefused, status: int, extra: dict[str, Any]
) -> None:
    problem = _refusal(refusal)
    assert (problem.status, problem.detail) == (status, str(refusal))
    assert problem.errors == extra.get("errors")
    assert problem.headers == extra.get("headers")
    assert problem.extra == extra.get("extra", {})
