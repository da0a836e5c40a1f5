"""Imports: an import of an outside study into a facility's archive, and each instance's outcome.

Revision ID: 0009_h41_imports
Revises: 0008_h22_cds
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_h41_imports"
down_revision = "0008_h22_cds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "import_job",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("facility_id", sa.String(64), nullable=False),
        sa.Column("source_facility_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("patient", sa.String(128), nullable=False, server_default=""),
        sa.Column("accession_policy", sa.String(8), nullable=False, server_default="keep"),
        sa.Column("via", sa.String(8), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("sent", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("verified", sa.Integer, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_import_job_study", "import_job", ["study_uid", "facility_id"])
    op.create_table(
        "import_instance",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("import_id", sa.Integer, sa.ForeignKey("import_job.id"), nullable=False),
        sa.Column("source_sop_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("code", sa.Integer, nullable=True),
        sa.Column("detail", sa.String(512), nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("import_id", "source_sop_uid", name="uq_import_instance"),
    )
    op.create_index("ix_import_instance_import_id", "import_instance", ["import_id"])


def downgrade() -> None:
    op.drop_table("import_instance")
    op.drop_table("import_job")
