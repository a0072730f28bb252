"""API: indexes for keyset paging of history (newest first, run_id breaking ties) and for
runs filtered by status.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-29
"""

from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Each new index starts with the columns of the one it replaces, so every earlier read keeps
# its index; history pages (by offset or after a cursor) read exactly the rows they return.
DDL = """
create index refresh_runs_history_idx on {s}.refresh_runs (started_at desc, run_id desc);
drop index {s}.refresh_runs_started_idx;
create index refresh_runs_status_idx on {s}.refresh_runs (status, started_at desc, run_id desc);
create index table_refreshes_history_idx on {s}.table_refreshes (table_name, started_at desc, run_id desc);
drop index {s}.table_refreshes_table_idx;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(DDL.format(s=f'"{schema}"'))


def downgrade() -> None:
    s = f'"{context.config.attributes["schema"]}"'
    op.execute(f"create index refresh_runs_started_idx on {s}.refresh_runs (started_at desc)")
    op.execute(f"create index table_refreshes_table_idx on {s}.table_refreshes (table_name, started_at desc)")
    for index in ("refresh_runs_history_idx", "refresh_runs_status_idx", "table_refreshes_history_idx"):
        op.execute(f"drop index if exists {s}.{index}")
