"""Identity: a table of named settings (the blocking-keys version, a key rebuild's cursor).

Revision ID: 0005_identity_settings
Revises: 0002_identity
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_identity_settings"
down_revision = "0002_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_setting",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Keys stored before this table existed are of an older version (no row: the broker
    # rebuilds them, identity.service.ensure_keys_current). An empty index has none, and the
    # records it gets from now on are keyed by version 2 (matching.KEYS_VERSION today).
    op.execute(
        "INSERT INTO identity_setting (name, value) SELECT 'keys_version', '2'"
        " WHERE NOT EXISTS (SELECT 1 FROM identity_record)"
    )


def downgrade() -> None:
    op.drop_table("identity_setting")
