"""API guards: tokens get an optional expiry and a last-used time; an Idempotency-Key is
unique per token, not across tokens.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from alembic import context, op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = """
alter table {s}.api_tokens add column expires_at timestamptz, add column last_used_at timestamptz;

-- One client's key cannot find (or block) another client's trigger.
alter table {s}.api_triggers drop constraint api_triggers_idempotency_key_key;
create unique index api_triggers_token_key on {s}.api_triggers (token_id, idempotency_key);
"""

DOWNGRADE = """
drop index {s}.api_triggers_token_key;
-- Keys two tokens share cannot both stay under the old rule: the newest keeps it.
delete from {s}.api_triggers a using {s}.api_triggers b
    where a.idempotency_key = b.idempotency_key and a.created_at < b.created_at;
alter table {s}.api_triggers add constraint api_triggers_idempotency_key_key unique (idempotency_key);
alter table {s}.api_tokens drop column expires_at, drop column last_used_at;
"""


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    # The schema name is validated by flows.settings before it gets here.
    op.execute(UPGRADE.format(s=f'"{schema}"'))


def downgrade() -> None:
    schema = context.config.attributes["schema"]
    op.execute(DOWNGRADE.format(s=f'"{schema}"'))
