"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis), against a
real `refresh api` (uvicorn) on the session's refreshed data: valid and invalid requests for
every operation, with an admin token. No response is a 5xx; every error is problem+json; a
rejected request leaves the control schema exactly as it was.

The refresh lock is held meanwhile, so an accepted trigger is a 409 and starts nothing.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import psycopg
import pytest
import schemathesis
from psycopg import sql
from schemathesis.generation.modes import GenerationMode

from flows.control import outbox, runs
from flows.core.settings import Settings
from tests.integration.api.support import auth, control_fingerprint

EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 350}


@pytest.fixture
def registry_restored(settings: Settings) -> Any:
    """Accepted PUTs change the registry: put it back afterwards for the other tests."""
    backup = sql.Identifier(settings.control_schema, "refresh_config")
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        rows = conn.execute(sql.SQL("select * from {}").format(backup)).fetchall()
        cols = [
            d.name for d in conn.execute(sql.SQL("select * from {} limit 0").format(backup)).description or []
        ]
    yield
    with psycopg.connect(settings.dsn()) as conn, conn.transaction():
        conn.execute(sql.SQL("delete from {}").format(backup))
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("insert into {} ({}) values ({})").format(
                    backup,
                    sql.SQL(", ").join(map(sql.Identifier, cols)),
                    sql.SQL(", ").join(sql.Placeholder() * len(cols)),
                ),
                [tuple(psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for v in r) for r in rows],
            )


@pytest.fixture
def webhooks_removed(settings: Settings) -> Any:
    """Endpoints an accepted POST created would receive the other tests' events: remove them."""
    yield
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for ep in outbox.list_endpoints(conn, settings.control_schema):
            outbox.remove_endpoint(conn, settings.control_schema, ep["id"], "test")


def test_fuzz_from_the_openapi_document(
    api_url: str,
    api_tokens: dict[str, str],
    settings: Settings,
    registry_restored: None,
    webhooks_removed: None,
) -> None:
    schema = schemathesis.openapi.from_url(f"{api_url}/api/openapi.json")
    headers = auth(api_tokens["admin"])
    counts: dict[str, int] = {}
    seen_status: set[int] = set()
    with runs.refresh_lock(settings):
        state = {"fingerprint": control_fingerprint(settings)}

        def check(case: Any) -> None:
            resp = case.call(base_url=api_url)
            key = f"{case.method} {case.path} {resp.status_code}"
            counts[key] = counts.get(key, 0) + 1
            seen_status.add(resp.status_code)
            assert resp.status_code < 500, f"{key}: {resp.text}"
            now = control_fingerprint(settings)
            if resp.status_code >= 400:
                assert resp.headers.get("content-type") == ["application/problem+json"], key
                assert now == state["fingerprint"], f"rejected {key} changed the control schema"
            state["fingerprint"] = now

        for mode, examples in EXAMPLES.items():
            hypothesis.settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.generate],
            )(hypothesis.given(case=schema.as_strategy(mode, headers=headers))(check))()
    total = sum(counts.values())
    print(f"\nschemathesis: {total} cases, statuses {sorted(seen_status)}")
    for key in sorted(counts):
        print(f"  {counts[key]:4d}  {key}")
    assert total >= 400
    assert {200, 404, 409, 422} <= seen_status
