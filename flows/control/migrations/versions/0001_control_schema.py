"""Control schema: table registry, checkpoints, runs, table/slice/dbt audit, DQ, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

DDL = """
create table {s}.refresh_config (
    table_name text primary key,
    source_table text not null,
    enabled boolean not null default true,
    mode text not null default 'live'
        check (mode in ('disabled', 'dry_run', 'shadow', 'live')),
    priority integer not null default 80 check (priority between 0 and 1000),
    refresh_frequency_hours integer not null default 24
        check (refresh_frequency_hours between 1 and 168),
    next_refresh_at timestamptz not null default now(),
    cursor_column text,
    slice_size text not null default 'week' check (slice_size in ('day', 'week', 'month')),
    lookback_days integer not null default 60 check (lookback_days between 0 and 3650),
    write_strategy text not null default 'slice_replace'
        check (write_strategy in ('slice_replace', 'full_replace')),
    custom_params jsonb not null default '{{}}'::jsonb,
    origin text not null default 'file' check (origin in ('file', 'auto', 'user')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    updated_by text,
    check (write_strategy = 'full_replace' or cursor_column is not null)
);

create table {s}.refresh_runs (
    run_id uuid primary key,
    flow_run_id uuid,
    status text not null
        check (status in ('running', 'success', 'warning', 'failed', 'abandoned')),
    trigger text not null default 'manual',
    params jsonb not null default '{{}}'::jsonb,
    plan jsonb,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    heartbeat_at timestamptz not null default now(),
    pid integer,
    hostname text,
    tables_planned integer not null default 0,
    tables_succeeded integer not null default 0,
    tables_failed integer not null default 0,
    rows_read bigint not null default 0,
    rows_inserted bigint not null default 0,
    dbt_invocation_id text,
    message text
);
create index refresh_runs_started_idx on {s}.refresh_runs (started_at desc);
create unique index refresh_runs_one_running on {s}.refresh_runs ((true)) where status = 'running';

create table {s}.table_refreshes (
    id bigserial primary key,
    run_id uuid not null references {s}.refresh_runs (run_id),
    table_name text not null,
    mode text not null,
    status text not null
        check (status in ('running', 'success', 'failed', 'skipped', 'planned')),
    write_strategy text not null,
    window_start timestamptz,
    window_end timestamptz,
    slices_planned integer not null default 0,
    slices_done integer not null default 0,
    slices_skipped integer not null default 0,
    rows_read bigint not null default 0,
    rows_inserted bigint not null default 0,
    rows_deleted bigint not null default 0,
    bytes_read bigint not null default 0,
    rows_per_second numeric,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    error text,
    unique (run_id, table_name)
);
create index table_refreshes_table_idx on {s}.table_refreshes (table_name, started_at desc);

create table {s}.slice_refreshes (
    id bigserial primary key,
    run_id uuid not null references {s}.refresh_runs (run_id),
    table_name text not null,
    slice_start timestamptz not null,
    slice_end timestamptz not null,
    status text not null check (status in ('success', 'failed')),
    rows_read bigint not null default 0,
    rows_inserted bigint not null default 0,
    rows_deleted bigint not null default 0,
    bytes_read bigint not null default 0,
    started_at timestamptz not null,
    finished_at timestamptz not null default now(),
    error text
);
create index slice_refreshes_run_idx on {s}.slice_refreshes (run_id, table_name);

create table {s}.checkpoints (
    table_name text not null,
    slice_start timestamptz not null,
    slice_end timestamptz not null,
    run_id uuid not null,
    rows_loaded bigint not null,
    committed_at timestamptz not null default now(),
    primary key (table_name, slice_start)
);

create table {s}.dbt_invocations (
    invocation_id text primary key,
    run_id uuid references {s}.refresh_runs (run_id),
    flow_run_id uuid,
    command text not null,
    args jsonb not null default '[]'::jsonb,
    success boolean not null,
    started_at timestamptz not null,
    finished_at timestamptz not null,
    nodes_total integer not null default 0,
    nodes_failed integer not null default 0,
    message text
);

create table {s}.dbt_node_runs (
    invocation_id text not null references {s}.dbt_invocations (invocation_id),
    unique_id text not null,
    resource_type text not null,
    name text not null,
    relation text,
    status text not null,
    started_at timestamptz,
    finished_at timestamptz,
    execution_time_s double precision,
    rows_affected bigint,
    message text,
    failures integer,
    primary key (invocation_id, unique_id)
);

create table {s}.dq_results (
    id bigserial primary key,
    run_id uuid references {s}.refresh_runs (run_id),
    table_name text not null,
    check_name text not null,
    period_start timestamptz,
    status text not null check (status in ('pass', 'warn', 'fail')),
    expected numeric,
    observed numeric,
    details jsonb not null default '{{}}'::jsonb,
    checked_at timestamptz not null default now()
);

create table {s}.events (
    id bigserial primary key,
    event text not null,
    table_name text,
    run_id uuid,
    payload jsonb not null default '{{}}'::jsonb,
    created_at timestamptz not null default now()
);
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(DDL.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    for table in (
        "events",
        "dq_results",
        "dbt_node_runs",
        "dbt_invocations",
        "checkpoints",
        "slice_refreshes",
        "table_refreshes",
        "refresh_runs",
        "refresh_config",
    ):
        op.execute(f'drop table if exists "{schema}".{table}')
