"""Cutover and rollback over HTTP (admin scope): the same functions as `refresh cutover` and
`refresh rollback` (flows.control.rollout), formatted as JSON or problem+json."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from flows.api.problems import Problem
from flows.api.routes import COMMON_ERRORS, PROBLEM, Admin, TablePath, _find, _schema
from flows.control import rollout
from flows.core.errors import ConfigError

router = APIRouter(prefix="/api/refresh")
ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    404: {"description": "Unknown table", **PROBLEM},
    409: {"description": "Refused by the table's mode or validation (detail: why)", **PROBLEM},
}


class CutoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(default=False, description="Cut over to live although validation did not pass")
    reason: str = Field(default="", max_length=500, description="Why (required with force); audited")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500, description="Why; audited")


def _change(change: rollout.ModeChange) -> dict[str, Any]:
    return asdict(change)


@router.post("/config/{table}/cutover", response_model=None, responses=ERRORS)
def cutover(request: Request, token: Admin, table: TablePath, body: CutoverRequest) -> dict[str, Any]:
    """Move a table one step, dry_run -> shadow -> live; live only after a passing validation
    of its shadow data (or `force` with a `reason`, recorded)."""
    if body.force and not body.reason.strip():
        raise Problem(
            422,
            "force needs a reason: say why the validation is overridden",
            errors=[{"field": "reason", "problem": "required when force is true"}],
        )
    settings = request.app.state.settings
    with request.app.state.pool.connection() as conn:
        _find(request, conn, table)
        try:
            change = rollout.cutover(
                conn,
                _schema(request),
                table,
                validated_schema=settings.shadow_schema,
                who=f"api:{token.name}" if token else "api",
                reason=body.reason,
                force=body.force,
            )
        except ConfigError as exc:
            raise Problem(409, str(exc)) from exc
    return _change(change)


@router.post("/config/{table}/rollback", response_model=None, responses=ERRORS)
def rollback(request: Request, token: Admin, table: TablePath, body: RollbackRequest) -> dict[str, Any]:
    """Return a table to the mode it had before its last cutover; its data stays as it is."""
    with request.app.state.pool.connection() as conn:
        _find(request, conn, table)
        try:
            change = rollout.rollback(
                conn, _schema(request), table, who=f"api:{token.name}" if token else "api", reason=body.reason
            )
        except ConfigError as exc:
            raise Problem(409, str(exc)) from exc
    return _change(change)
