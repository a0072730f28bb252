"""A whole-table (full_replace) slice spans '-infinity'..'infinity' instead of 0001-01-01 ..
9999-12-31: a year-1 timestamp read in a session west of UTC is a BC value Python cannot hold,
and an infinite bound is the same in every time zone (flows.control.checkpoints).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from alembic import context, op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Offsets written out: the literals mean the same instant whatever the session's zone.
UPGRADE = """
update {s}.checkpoints set slice_start = '-infinity', slice_end = 'infinity'
where slice_start < '0001-01-02 00:00:00+00';
update {s}.slice_refreshes set slice_start = '-infinity', slice_end = 'infinity'
where slice_start < '0001-01-02 00:00:00+00';
"""

DOWNGRADE = """
update {s}.checkpoints set slice_start = '0001-01-01 00:00:00+00', slice_end = '9999-12-31 00:00:00+00'
where not isfinite(slice_start);
update {s}.slice_refreshes set slice_start = '0001-01-01 00:00:00+00', slice_end = '9999-12-31 00:00:00+00'
where not isfinite(slice_start);
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(UPGRADE.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(DOWNGRADE.format(s=f'"{schema}"'))
