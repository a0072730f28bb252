"""Helpers of the API tests."""

from __future__ import annotations

import psycopg
from psycopg import sql

from flows.settings import Settings


def control_fingerprint(settings: Settings) -> dict[str, str]:
    """md5 of every control-schema table's rows (in a stable order), per table."""
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "select table_name from information_schema.tables where table_schema = %s "
                "and table_type = 'BASE TABLE' order by 1",
                (settings.control_schema,),
            ).fetchall()
        ]
        out = {}
        for name in names:
            row = conn.execute(
                sql.SQL(
                    "select md5(coalesce(string_agg(t::text, '|' order by t::text), '')) from {} t"
                ).format(sql.Identifier(settings.control_schema, name))
            ).fetchone()
            assert row is not None
            out[name] = row[0]
        return out


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
