"""Consent: patients' sharing choices, break-the-glass grants, and each facility's consent policy.

Revision ID: 0010_consent
Revises: 0009_h41_imports
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_consent"
down_revision = "0009_h41_imports"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("facility") as batch:
        batch.add_column(
            sa.Column("consent_policy", sa.String(length=8), nullable=False, server_default="opt-out")
        )
    op.create_table(
        "consent",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patient.pk"), nullable=False),
        sa.Column("person_id", sa.Integer, nullable=True),
        sa.Column("recorded_at_facility", sa.String(64), nullable=False),
        sa.Column("scope_facility", sa.String(64), nullable=False, server_default=""),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("recorded_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("source", sa.String(8), nullable=False, server_default="api"),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("patient_pk", "scope_facility", name="uq_consent_patient_scope"),
    )
    op.create_index("ix_consent_patient", "consent", ["patient_pk"])
    op.create_table(
        "break_glass",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("who", sa.String(128), nullable=False),
        sa.Column("issuer", sa.String(256), nullable=False, server_default=""),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("facility", sa.String(64), nullable=False),
        sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patient.pk"), nullable=False),
        sa.Column("person_id", sa.Integer, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewed", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_break_glass_who", "break_glass", ["who", "facility", "expires_at"])


def downgrade() -> None:
    op.drop_table("break_glass")
    op.drop_table("consent")
    with op.batch_alter_table("facility") as batch:
        batch.drop_column("consent_policy")
