"""/api/refresh/webhooks: endpoints, their deliveries, a test event and secret rotation, all
with the `admin` scope. Thin: the same functions `refresh webhooks` calls (flows.notify.webhooks for
changes, flows.control.outbox for reads). A secret appears only in the answers to create and
rotate-secret."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from flows.api.problems import Problem
from flows.api.responses import FastJSONResponse
from flows.api.routes import COMMON_ERRORS, PROBLEM, Admin, Page
from flows.control import outbox
from flows.control.tokens import TokenInfo
from flows.notify import endpoint_checks, endpoints, webhook_events

router = APIRouter(prefix="/api/refresh/webhooks", tags=["webhooks"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    404: {"description": "No such endpoint (or it was removed)", **PROBLEM},
}
EndpointId = Annotated[int, Path(ge=1, le=2**62, description="Endpoint id")]
EventType = Annotated[str, Field(min_length=1, max_length=100)]
EVENTS_HELP = f"Event types to subscribe: {', '.join(webhook_events.EVENT_TYPES)}"


def _who(token: TokenInfo | None) -> str:
    return f"api:{token.name}" if token else "api"


@contextmanager
def _problems() -> Iterator[None]:
    """Bad input names its field (422); an unknown endpoint is a 404."""
    try:
        yield
    except outbox.EndpointNotFound as exc:
        raise Problem(404, str(exc)) from None
    except endpoint_checks.WebhookInputError as exc:
        raise Problem(422, str(exc), errors=[{"field": exc.field, "problem": str(exc)}]) from None


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=endpoint_checks.MAX_URL_CHARS, description="http(s) URL the events are POSTed to"
    )
    description: str = Field(default="", max_length=endpoint_checks.MAX_DESCRIPTION_CHARS)
    event_types: list[EventType] | None = Field(
        default=None, max_length=50, description=f"{EVENTS_HELP}; empty or absent = all"
    )


class EndpointChanges(BaseModel):
    """Fields to change; absent (or null) = keep. The secret changes only by rotate-secret."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=endpoint_checks.MAX_URL_CHARS)
    description: str | None = Field(default=None, max_length=endpoint_checks.MAX_DESCRIPTION_CHARS)
    event_types: list[EventType] | None = Field(
        default=None, min_length=1, max_length=50, description=EVENTS_HELP
    )
    enabled: bool | None = Field(default=None, description="false cancels the pending deliveries")


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_hours: float | None = Field(
        default=None,
        ge=0,
        le=720,
        description="Hours the old secret still signs (default REFRESH_WEBHOOK_ROTATION_GRACE_HOURS)",
    )


@router.get("", response_model=None, responses=COMMON_ERRORS)
def list_endpoints(request: Request, _: Admin) -> FastJSONResponse:
    """Every endpoint (never a secret)."""
    with request.app.state.pool.connection() as conn:
        return FastJSONResponse(outbox.list_endpoints(conn, request.app.state.settings.control_schema))


@router.post(
    "",
    status_code=201,
    response_model=None,
    responses={**COMMON_ERRORS, 201: {"description": "Created; `secret` is shown this once"}},
)
def create_endpoint(request: Request, token: Admin, body: EndpointCreate) -> JSONResponse:
    """Register an endpoint, validated as `refresh webhooks add` does (http(s) only; loopback,
    link-local and private addresses refused unless REFRESH_WEBHOOK_ALLOW_PRIVATE). The answer
    carries its signing secret, once: store it in the receiver."""
    settings = request.app.state.settings
    with _problems():
        new = endpoints.add_endpoint(settings, body.url, body.event_types, body.description, who=_who(token))
    with request.app.state.pool.connection() as conn:
        endpoint = outbox.get_endpoint(conn, settings.control_schema, new.id)
    return FastJSONResponse(
        {**endpoint, "secret": new.secret},
        status_code=201,
        headers={"Location": f"/api/refresh/webhooks/{new.id}", "Cache-Control": "no-store"},
    )


@router.get("/{endpoint_id}", response_model=None, responses=NOT_FOUND)
def get_endpoint(request: Request, _: Admin, endpoint_id: EndpointId) -> FastJSONResponse:
    """One endpoint (never its secret)."""
    with _problems(), request.app.state.pool.connection() as conn:
        return FastJSONResponse(
            outbox.get_endpoint(conn, request.app.state.settings.control_schema, endpoint_id)
        )


@router.patch("/{endpoint_id}", response_model=None, responses=NOT_FOUND)
def update_endpoint(
    request: Request, token: Admin, endpoint_id: EndpointId, body: EndpointChanges
) -> FastJSONResponse:
    """Change the URL, description, event types or enabled state, validated as on create."""
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise Problem(
            422, "nothing to change: send at least one field", errors=[{"field": "body", "problem": "empty"}]
        )
    with _problems():
        endpoint = endpoints.update_endpoint(
            request.app.state.settings, endpoint_id, who=_who(token), **changes
        )
    return FastJSONResponse(endpoint)


@router.delete("/{endpoint_id}", status_code=204, response_model=None, responses=NOT_FOUND)
def delete_endpoint(request: Request, token: Admin, endpoint_id: EndpointId) -> Response:
    """Remove: nothing more is sent to it (pending deliveries are cancelled); its history stays."""
    with _problems(), request.app.state.pool.connection() as conn, conn.transaction():
        outbox.remove_endpoint(conn, request.app.state.settings.control_schema, endpoint_id, _who(token))
    return Response(status_code=204)


@router.get("/{endpoint_id}/deliveries", response_model=None, responses=NOT_FOUND)
def deliveries(
    request: Request,
    _: Admin,
    endpoint_id: EndpointId,
    status: Annotated[
        outbox.DeliveryStatus | None,
        Query(description="Only this status"),
    ] = None,
    page: Page = 1,
    page_size: Annotated[int, Query(ge=1, le=100, description="Deliveries per page")] = 20,
) -> FastJSONResponse:
    """The endpoint's deliveries, newest first, paged, each with every attempt (status,
    latency, the first 1 KB of the answer, error)."""
    schema = request.app.state.settings.control_schema
    with _problems(), request.app.state.pool.connection() as conn:
        outbox.get_endpoint(conn, schema, endpoint_id)
        total = outbox.count_deliveries(conn, schema, endpoint_id=endpoint_id, status=status)
        rows = outbox.list_deliveries(
            conn,
            schema,
            endpoint_id=endpoint_id,
            status=status,
            limit=page_size,
            offset=(page - 1) * page_size,
            with_attempts=True,
        )
    return FastJSONResponse(
        {
            "page": page,
            "page_size": page_size,
            "total": total,
            "pages": max(1, -(-total // page_size)),
            "items": rows,
        }
    )


@router.post(
    "/{endpoint_id}/test",
    response_model=None,
    responses={**NOT_FOUND, 200: {"description": "Sent; `delivered` says whether the receiver answered 2xx"}},
)
def test_endpoint(request: Request, token: Admin, endpoint_id: EndpointId) -> FastJSONResponse:
    """Send a signed `webhook.test` event to this endpoint now (waits for the one attempt, at
    most the attempt timeout); a failed attempt is retried on the usual schedule."""
    settings = request.app.state.settings
    with _problems():
        sent = endpoints.send_test(settings, endpoint_id, who=_who(token))
    with request.app.state.pool.connection() as conn:
        [row] = outbox.list_deliveries(
            conn, settings.control_schema, delivery_id=sent.delivery_id, with_attempts=True
        )
    return FastJSONResponse({**row, "delivered": sent.result.succeeded > 0})


@router.post("/{endpoint_id}/rotate-secret", response_model=None, responses=NOT_FOUND)
def rotate_secret(
    request: Request, token: Admin, endpoint_id: EndpointId, body: Rotation | None = None
) -> FastJSONResponse:
    """A new signing secret, shown this once; the old one also signs (two signatures) for the
    grace period."""
    settings = request.app.state.settings
    grace = body.grace_hours if body else None
    with _problems():
        secret = endpoints.rotate_secret(settings, endpoint_id, grace, who=_who(token))
    with request.app.state.pool.connection() as conn:
        endpoint = outbox.get_endpoint(conn, settings.control_schema, endpoint_id)
    return FastJSONResponse({**endpoint, "secret": secret}, headers={"Cache-Control": "no-store"})
