"""Change detection: each checkpoint keeps the fingerprint (row count and checksum) of what it
loaded, slices found unchanged are audited as such, and the registry can turn it off per table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DDL = """
-- The fingerprint of the rows the slice's load committed (computed in Postgres, in the same
-- transaction), and the BigQuery time of the fingerprint query that preceded the read (the
-- partition metadata check compares partition modification times with it). NULL: unknown.
alter table {s}.checkpoints
    add column source_rows bigint,
    add column source_checksum numeric,
    add column source_as_of timestamptz;

alter table {s}.refresh_config
    add column change_detection text not null default 'checksum'
        check (change_detection in ('checksum', 'off'));

alter table {s}.slice_refreshes drop constraint slice_refreshes_status_check;
alter table {s}.slice_refreshes add constraint slice_refreshes_status_check
    check (status in ('success', 'failed', 'unchanged'));
-- Why the slice was skipped (unchanged) or read (new, changed: what differed).
alter table {s}.slice_refreshes add column change_reason text;

-- What change detection cost and saved: BigQuery's dry-run estimate of the fingerprint
-- queries' bytes, and the slices it found unchanged (not read).
alter table {s}.table_refreshes
    add column fingerprint_bytes bigint,
    add column slices_unchanged integer not null default 0;
"""

UNDO = """
alter table {s}.table_refreshes drop column slices_unchanged, drop column fingerprint_bytes;
-- The old constraint cannot hold the audit rows of skipped slices.
alter table {s}.slice_refreshes drop constraint slice_refreshes_status_check;
delete from {s}.slice_refreshes where status = 'unchanged';
alter table {s}.slice_refreshes drop column change_reason;
alter table {s}.slice_refreshes add constraint slice_refreshes_status_check
    check (status in ('success', 'failed'));
alter table {s}.refresh_config drop column change_detection;
alter table {s}.checkpoints
    drop column source_as_of, drop column source_checksum, drop column source_rows;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(DDL.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(UNDO.format(s=f'"{schema}"'))
