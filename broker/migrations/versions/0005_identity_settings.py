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
    # No version row: keys stored before this table existed are of an older version, and the
    # broker rebuilds them (identity.service.ensure_keys_current).
    op.create_table(
        "identity_setting",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("identity_setting")
