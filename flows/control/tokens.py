"""API bearer tokens: created, verified, listed and revoked; only a hash is ever stored.

A token reads `sqpr_<token_id>_<secret>`. The id finds the row; the secret's SHA-256 (the
secret is 256 random bits, so a plain hash is enough, no slow KDF) is compared with
hmac.compare_digest, so the comparison takes the same time whatever matches. A token may
expire (`expires_at`); its last use is recorded to the minute (`last_used_at`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql

from flows.core.db import qualified
from flows.core.errors import ConfigError

PREFIX = "sqpr"
MAX_NAME_LENGTH = 80
# last_used_at is written at most this often per token: not a write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class Scope(StrEnum):
    READ = "read"
    TRIGGER = "trigger"
    ADMIN = "admin"


# What each scope also allows: admin can do everything, trigger can read.
IMPLIES = {
    Scope.READ: {Scope.READ},
    Scope.TRIGGER: {Scope.TRIGGER, Scope.READ},
    Scope.ADMIN: {Scope.ADMIN, Scope.TRIGGER, Scope.READ},
}


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    name: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None

    def allows(self, scope: Scope) -> bool:
        return any(scope in IMPLIES[s] for s in self.scopes)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_scopes(values: list[str]) -> tuple[Scope, ...]:
    problems = [v for v in values if v not in {s.value for s in Scope}]
    if problems or not values:
        raise ConfigError(
            f"unknown scope(s) {', '.join(problems) or '(none given)'}: use read, trigger or admin"
        )
    return tuple(dict.fromkeys(Scope(v) for v in values))


def create(
    conn: psycopg.Connection,
    schema: str,
    name: str,
    scopes: list[str],
    who: str = "cli",
    expires_at: datetime | None = None,
) -> tuple[str, TokenInfo]:
    """A new token, valid until `expires_at` (None: until revoked); the plain text is returned
    once and never stored."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"token name must be 1-{MAX_NAME_LENGTH} characters")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise ConfigError(f"token expiry {expires_at:%Y-%m-%d %H:%M} UTC is not in the future")
    parsed = parse_scopes(scopes)
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    try:
        row = conn.execute(
            sql.SQL(
                "insert into {t} (token_id, name, scopes, secret_sha256, created_by, expires_at) "
                "values (%s, %s, %s, %s, %s, %s) returning created_at"
            ).format(t=qualified(schema, "api_tokens")),
            (token_id, name, [s.value for s in parsed], _digest(secret), who, expires_at),
        ).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        raise ConfigError(
            f"an active token is already named {name!r}: revoke it or pick another name"
        ) from exc
    assert row is not None
    return f"{PREFIX}_{token_id}_{secret}", TokenInfo(token_id, name, parsed, row[0], expires_at=expires_at)


def _parts(token: str) -> tuple[str, str] | None:
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not token_id or not secret:
        return None
    return token_id, secret


def _verify_query(schema: str) -> sql.Composed:
    return sql.SQL(
        "select name, scopes, secret_sha256, created_at, expires_at, last_used_at, now() from {t} "
        "where token_id = %s and revoked_at is null and (expires_at is null or expires_at > now())"
    ).format(t=qualified(schema, "api_tokens"))


def _touch_query(schema: str) -> sql.Composed:
    return sql.SQL("update {t} set last_used_at = now() where token_id = %s").format(
        t=qualified(schema, "api_tokens")
    )


def _verified(row: tuple[Any, ...] | None, token_id: str, secret: str) -> tuple[TokenInfo | None, bool]:
    """The token if the secret matches, and whether its last use is to be recorded."""
    if row is None or not hmac.compare_digest(bytes(row[2]), _digest(secret)):
        return None, False
    info = TokenInfo(token_id, row[0], tuple(Scope(s) for s in row[1]), row[3], None, row[4], row[5])
    return info, row[5] is None or row[6] - row[5] >= LAST_USED_RESOLUTION


def verify(conn: psycopg.Connection, schema: str, token: str) -> TokenInfo | None:
    """The active token this string is, or None (malformed, unknown, revoked, expired or wrong
    secret); records its use."""
    parts = _parts(token)
    if parts is None:
        return None
    info, touch = _verified(conn.execute(_verify_query(schema), (parts[0],)).fetchone(), *parts)
    if touch:
        conn.execute(_touch_query(schema), (parts[0],))
    return info


async def verify_async(conn: psycopg.AsyncConnection[Any], schema: str, token: str) -> TokenInfo | None:
    """`verify` on an async connection (the API's request path)."""
    parts = _parts(token)
    if parts is None:
        return None
    cur = await conn.execute(_verify_query(schema), (parts[0],))
    info, touch = _verified(await cur.fetchone(), *parts)
    if touch:
        await conn.execute(_touch_query(schema), (parts[0],))
    return info


COLUMNS = sql.SQL("token_id, name, scopes, created_at, revoked_at, expires_at, last_used_at")


def _info(row: tuple[Any, ...]) -> TokenInfo:
    return TokenInfo(row[0], row[1], tuple(Scope(s) for s in row[2]), *row[3:])


def revoke(conn: psycopg.Connection, schema: str, name_or_id: str) -> TokenInfo:
    """Revoke the active token with this name or id."""
    row = conn.execute(
        sql.SQL(
            "update {t} set revoked_at = now() where revoked_at is null and (token_id = %s or name = %s) "
            "returning {c}"
        ).format(t=qualified(schema, "api_tokens"), c=COLUMNS),
        (name_or_id, name_or_id),
    ).fetchone()
    if row is None:
        raise ConfigError(f"no active token named {name_or_id!r} (see `refresh token list`)")
    return _info(row)


def list_tokens(conn: psycopg.Connection, schema: str, include_revoked: bool = False) -> list[TokenInfo]:
    """Tokens not revoked (expired ones too: their expiry says so), or all of them."""
    rows = conn.execute(
        sql.SQL("select {c} from {t} where %s or revoked_at is null order by created_at").format(
            c=COLUMNS, t=qualified(schema, "api_tokens")
        ),
        (include_revoked,),
    ).fetchall()
    return [_info(r) for r in rows]
