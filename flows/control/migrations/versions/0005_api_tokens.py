"""API: bearer tokens (hashed), the triggers the API started (idempotency keys), and an index
for its status reads.

Revision ID: 0005
Revises: 0001
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

DDL = """
create table {s}.api_tokens (
    token_id text primary key,
    name text not null,
    scopes text[] not null check (scopes <@ array['read', 'trigger', 'admin']::text[]),
    secret_sha256 bytea not null,
    created_at timestamptz not null default now(),
    created_by text,
    revoked_at timestamptz
);
create unique index api_tokens_active_name on {s}.api_tokens (name) where revoked_at is null;

create table {s}.api_triggers (
    trigger_id uuid primary key,
    idempotency_key text unique,
    request_sha256 text not null,
    params jsonb not null,
    via text not null check (via in ('prefect', 'process')),
    flow_run_id uuid,
    pid integer,
    hostname text,
    token_id text,
    created_at timestamptz not null default now()
);
create index api_triggers_created_idx on {s}.api_triggers (created_at desc);

-- The API's status reads each table's latest success on every request: an index for it
-- instead of a sort of the table's whole history.
create index table_refreshes_last_success_idx on {s}.table_refreshes (table_name, finished_at desc)
    where status = 'success';
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(DDL.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(f'drop index if exists "{schema}".table_refreshes_last_success_idx')
    for table in ("api_triggers", "api_tokens"):
        op.execute(f'drop table if exists "{schema}".{table}')
