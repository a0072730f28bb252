"""Bearer-token auth: each route names the scope it needs; tokens live hashed in the control
schema (flows.control.tokens). A token is never logged or echoed back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flows.api import clients
from flows.api.problems import Problem
from flows.control import tokens
from flows.control.tokens import Scope, TokenInfo

bearer = HTTPBearer(auto_error=False, description="A token from `refresh token create`")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="refresh"'}


def anonymous_read(request: Request) -> bool:
    """Reads without a token: when the operator allowed them, for a loopback client only."""
    state = request.app.state
    return bool(state.settings.api_anonymous_read) and clients.is_loopback(
        request.scope, state.trusted_proxies
    )


def require(scope: Scope) -> Callable[..., Awaitable[TokenInfo | None]]:
    """A dependency: the caller's token if it has `scope`; None for an anonymous read when
    the operator allowed those (REFRESH_API_ANONYMOUS_READ)."""

    async def check(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> TokenInfo | None:
        state = request.app.state
        if creds is None:
            if scope is Scope.READ and anonymous_read(request):
                return None
            local_only = " (reads without one are for loopback clients only)" if scope is Scope.READ else ""
            raise Problem(
                401, f"this needs a bearer token with scope {scope.value!r}{local_only}", headers=CHALLENGE
            )
        async with state.apool.connection() as conn:
            info = await tokens.verify_async(conn, state.settings.control_schema, creds.credentials)
        if info is None:
            raise Problem(401, "the bearer token is unknown, revoked or expired", headers=CHALLENGE)
        if not info.allows(scope):
            raise Problem(
                403,
                f"token {info.name!r} has scope(s) {', '.join(s.value for s in info.scopes)}; "
                f"this needs {scope.value!r}",
            )
        return info

    return check
