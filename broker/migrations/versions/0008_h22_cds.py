"""CDS Hooks: the cards the service issued and the feedback CDS clients posted.

Revision ID: 0008_h22_cds
Revises: 0007_lookup
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_h22_cds"
down_revision = "0007_lookup"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cds_card",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("hook_instance", sa.String(64), nullable=False),
        sa.Column("suggestion_uuid", sa.String(36), nullable=True),
        sa.Column("order_ref", sa.String(128), nullable=False, server_default=""),
        sa.Column("planned_exam", sa.String(256), nullable=False),
        sa.Column("prior_study_uid", sa.String(64), nullable=False),
        sa.Column("facility_id", sa.String(64), nullable=False),
        sa.Column("indicator", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("avoided_id", sa.Integer, nullable=True),
    )
    op.create_index("ix_cds_card_issued_at", "cds_card", ["issued_at"])
    op.create_table(
        "cds_feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("card_uuid", sa.String(36), nullable=False),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("accepted_suggestions", sa.String(1024), nullable=False, server_default=""),
        sa.Column("override_system", sa.String(256), nullable=False, server_default=""),
        sa.Column("override_code", sa.String(64), nullable=False, server_default=""),
        sa.Column("override_display", sa.String(256), nullable=False, server_default=""),
        sa.Column("user_comment", sa.String(1024), nullable=False, server_default=""),
        sa.Column("outcome_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("avoided_id", sa.Integer, nullable=True),
    )
    op.create_index("ix_cds_feedback_card", "cds_feedback", ["card_uuid"])


def downgrade() -> None:
    op.drop_table("cds_feedback")
    op.drop_table("cds_card")
