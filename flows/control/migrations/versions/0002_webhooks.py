"""Webhooks: the events table becomes the outbox; endpoints, deliveries and attempts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DDL = """
-- Every event gets the id receivers deduplicate on (`webhook-id`); rows that existed before
-- this revision get one too.
alter table {s}.events
    add column event_id text not null default ('msg_' || replace(gen_random_uuid()::text, '-', ''));
alter table {s}.events add constraint events_event_id_key unique (event_id);
create index events_created_idx on {s}.events (created_at);

create table {s}.webhook_endpoints (
    id bigserial primary key,
    url text not null check (url ~ '^https?://'),
    description text not null default '',
    event_types text[] not null check (cardinality(event_types) > 0),
    enabled boolean not null default true,
    secret_enc text not null,
    previous_secret_enc text,
    previous_secret_expires_at timestamptz,
    disabled_reason text,
    removed_at timestamptz,
    created_at timestamptz not null default now(),
    created_by text not null,
    updated_at timestamptz not null default now(),
    updated_by text not null
);

create table {s}.webhook_deliveries (
    id bigserial primary key,
    event_id bigint not null references {s}.events (id) on delete cascade,
    endpoint_id bigint not null references {s}.webhook_endpoints (id) on delete cascade,
    status text not null default 'pending'
        check (status in ('pending', 'succeeded', 'exhausted', 'cancelled')),
    attempts integer not null default 0,
    retry_from timestamptz not null default now(),
    next_attempt_at timestamptz not null default now(),
    last_attempt_at timestamptz,
    last_status_code integer,
    last_error text,
    created_at timestamptz not null default now(),
    unique (event_id, endpoint_id)
);
create index webhook_deliveries_due_idx on {s}.webhook_deliveries (next_attempt_at)
    where status = 'pending';

create table {s}.webhook_attempts (
    id bigserial primary key,
    delivery_id bigint not null references {s}.webhook_deliveries (id) on delete cascade,
    attempt integer not null,
    attempted_at timestamptz not null default now(),
    success boolean not null,
    status_code integer,
    latency_ms double precision,
    response_body text,
    error text
);
create index webhook_attempts_delivery_idx on {s}.webhook_attempts (delivery_id, attempt);
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(DDL.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    for table in ("webhook_attempts", "webhook_deliveries", "webhook_endpoints"):
        op.execute(f'drop table if exists "{schema}".{table}')
    op.execute(f'drop index if exists "{schema}".events_created_idx')
    op.execute(f'alter table "{schema}".events drop column if exists event_id')
