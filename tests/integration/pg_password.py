"""A Postgres role of the tests' own, with a password the tests know (to look for it in outputs)."""

from __future__ import annotations

from urllib.parse import quote

import psycopg
from psycopg import sql

from flows.core.settings import Settings

# Distinctive, so a scan for it finds nothing else.
SECRET_PASSWORD = "Pw7xQ2-sEcReT-91zK"
SECRET_USER = "sqp_secret_user"


def password_dsn(settings: Settings, password: str = SECRET_PASSWORD) -> str:
    """A URI DSN for SECRET_USER, which logs in with SECRET_PASSWORD only (scram over TCP)."""
    hba = settings.pg_data_dir / "pg_hba.conf"
    rule = f"host all {SECRET_USER} 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text()
    if rule not in text:
        hba.write_text(rule + text)  # the first matching line wins over the trust lines
    with psycopg.connect(settings.dsn(), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (SECRET_USER,)).fetchone()
        verb = "alter" if exists else "create"
        conn.execute(
            sql.SQL(verb + " role {} login superuser password {}").format(
                sql.Identifier(SECRET_USER), sql.Literal(SECRET_PASSWORD)
            )
        )
        conn.execute("select pg_reload_conf()")
    return (
        f"postgresql://{SECRET_USER}:{quote(password, safe='')}@127.0.0.1:{settings.local_pg_port}/postgres"
    )
