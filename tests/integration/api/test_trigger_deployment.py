"""POST /api/refresh/trigger through a Prefect deployment: a real `prefect server start`, the
`daily-refresh/daily` deployment registered on it, and the real `refresh api` in its own
process with PREFECT_API_URL set. The flow run is created, not run (no worker): what is
checked is what the API asks Prefect for, and that a retried request gets the same run."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest

from flows.control import tokens
from flows.control.runs import refresh_lock
from flows.core.db import migrate
from flows.core.settings import Settings, get_settings
from tests.integration.api.support import api_process, auth
from tests.prefect_server import prefect_server

SCHEMA = "deploy_control"
TABLES_FILE = """
tables:
  deploy_products:
    source_table: products
    write_strategy: full_replace
"""


@pytest.fixture(scope="module")
def deployed(stack: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    """A Prefect server with the daily-refresh deployment registered; its API URL and this
    module's settings (own control schema and registry)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.orchestration.deployments import daily_refresh_deployment

    tables_file = tmp_path_factory.mktemp("deploy") / "tables.yml"
    tables_file.write_text(TABLES_FILE)
    settings = get_settings(control_schema=SCHEMA, tables_file=tables_file)
    with (
        prefect_server(Path(tempfile.mkdtemp(prefix="sqp-prefect-"))) as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
    ):
        daily_refresh_deployment(settings).apply()
        yield url, settings


@pytest.fixture(scope="module")
def api(deployed: tuple[str, Settings], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`refresh api` in its own process, talking to the module's Prefect server."""
    prefect_url, settings = deployed
    log_path = tmp_path_factory.mktemp("deploy-api") / "api.log"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_url,
        "REFRESH_CONTROL_SCHEMA": SCHEMA,
        "REFRESH_TABLES_FILE": str(settings.tables_file),
        "REFRESH_API_ANONYMOUS_READ": "false",
    }
    with api_process(env, log_path) as url:
        yield url


@pytest.fixture(scope="module")
def trigger_token(deployed: tuple[str, Settings]) -> str:
    _, settings = deployed
    migrate(settings)
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        token, _ = tokens.create(conn, SCHEMA, "deploy-trigger", ["trigger"])
    return token


def _flow_runs(deployment_name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(deployment_name)
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )

    return asyncio.run(read())


def test_trigger_creates_a_flow_run_of_the_deployment_once_per_idempotency_key(
    deployed: tuple[str, Settings], api: str, trigger_token: str
) -> None:
    _, settings = deployed
    h = {**auth(trigger_token), "Idempotency-Key": "deploy-test-1"}
    body = {"tables": ["deploy_products"], "force": True, "dry_run": True, "start_date": "2026-01-05"}
    with httpx.Client(base_url=api, timeout=60) as c:
        first = c.post("/api/refresh/trigger", json=body, headers=h)
        assert first.status_code == 202, first.text
        started = first.json()
        assert started["via"] == "prefect" and started["replayed"] is False
        flow_run_id = UUID(started["flow_run_id"])

        runs = _flow_runs("daily-refresh/daily")
        assert [r.id for r in runs] == [flow_run_id]
        run = runs[0]
        assert run.parameters == {
            "tables": ["deploy_products"],
            "start_date": "2026-01-05",
            "end_date": None,
            "dry_run": True,
            "force": True,
            "trigger": "api",
        }
        assert "api" in run.tags
        assert run.idempotency_key == "deploy-test-1"

        # The client retries the same request, while a refresh holds the lock: the same run
        # back (202), not a 409; a new request meanwhile gets the 409.
        with refresh_lock(settings):
            again = c.post("/api/refresh/trigger", json=body, headers=h)
            assert again.status_code == 202, again.text
            assert again.json()["replayed"] is True
            assert again.json()["flow_run_id"] == str(flow_run_id)
            assert again.json()["trigger_id"] == started["trigger_id"]
            other = c.post(
                "/api/refresh/trigger", json=body, headers={**h, "Idempotency-Key": "deploy-test-2"}
            )
            assert other.status_code == 409, other.text
        # The same key with another request is refused, not silently mapped to the first run.
        changed = c.post("/api/refresh/trigger", json={**body, "dry_run": False}, headers=h)
        assert changed.status_code == 422 and "Idempotency-Key" in changed.text
    assert [r.id for r in _flow_runs("daily-refresh/daily")] == [flow_run_id]
