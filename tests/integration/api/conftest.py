"""Shared by the API tests: an app on the session's refreshed data, tokens per scope, and a
fingerprint of the whole control schema (to prove a rejected request changed nothing)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from flows.api.app import create_app
from flows.control import tokens
from flows.core.settings import Settings
from tests.integration.api.support import api_process


@pytest.fixture(scope="module")
def api_tokens(refreshed: dict[str, Any], settings: Settings) -> dict[str, str]:
    """One token per scope (plus one revoked), names unique per module."""
    from flows.core.db import migrate

    migrate(settings)
    made = {}
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        for scope in ("read", "trigger", "admin"):
            made[scope], _ = tokens.create(conn, settings.control_schema, f"{scope}-{id(made)}", [scope])
        made["revoked"], info = tokens.create(conn, settings.control_schema, f"revoked-{id(made)}", ["admin"])
        tokens.revoke(conn, settings.control_schema, info.token_id)
    return made


@pytest.fixture(scope="module")
def client(refreshed: dict[str, Any], settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_anonymous_read": False}))) as c:
        yield c


@pytest.fixture(scope="module")
def api_url(
    refreshed: dict[str, Any], settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`refresh api` in its own process on a free port; reads need a token."""
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    with api_process({**os.environ, "REFRESH_API_ANONYMOUS_READ": "false"}, log_path) as url:
        yield url
