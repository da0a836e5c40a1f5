"""Imports: per destination facility, the StudyID policy and the institution attributes to set.

Revision ID: 0010_import_config
Revises: 0009_h41_imports
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_import_config"
down_revision = "0009_h41_imports"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Its own table rather than columns of `facility`: the registry is shared by every domain.
    op.create_table(
        "import_destination",
        sa.Column("facility_id", sa.String(64), primary_key=True),
        sa.Column("study_id_policy", sa.String(16), nullable=False, server_default="keep"),
        sa.Column("institution", sa.Text, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("import_destination")
