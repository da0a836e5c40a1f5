"""Federation: facility endpoints and sharing policy, calling AE titles, sync state, study
locations; durable jobs.

Revision ID: 0003_federation
Revises: 0001_core
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_federation"
down_revision = "0001_core"
branch_labels = ("federation",)
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("facility") as batch:
        batch.add_column(sa.Column("dicomweb_url", sa.String(length=1024), nullable=True))
        batch.add_column(sa.Column("ae_title", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("port", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("sharing_policy", sa.String(length=16), nullable=False, server_default="share_all")
        )
    op.create_table(
        "facility_ae",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["facility_id"], ["facility.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("ae_title"),
    )
    op.create_index("ix_facility_ae_facility_id", "facility_ae", ["facility_id"], unique=False)
    op.create_table(
        "sync_state",
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.Column("last_job_id", sa.Integer(), nullable=True),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.String(length=16), nullable=False),
        sa.Column("last_error", sa.String(length=1024), nullable=False),
        sa.Column("studies_at_facility", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["facility_id"], ["facility.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("facility_id"),
    )
    op.create_table(
        "study_location",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.Column("has_pixels", sa.Boolean(), nullable=False),
        sa.Column("remote_series", sa.Integer(), nullable=False),
        sa.Column("remote_instances", sa.Integer(), nullable=False),
        sa.Column("seen_job", sa.Integer(), nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["facility_id"], ["facility.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_uid", "facility_id"),
    )
    op.create_index(
        "ix_study_location_facility_seen", "study_location", ["facility_id", "seen_job"], unique=False
    )
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("message", sa.String(length=512), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_status_id", "job", ["status", "id"], unique=False)
    op.create_index("ix_job_kind_key", "job", ["kind", "key"], unique=False)


def downgrade() -> None:
    for table in ("job", "study_location", "sync_state", "facility_ae"):
        op.drop_table(table)
    with op.batch_alter_table("facility") as batch:
        for column in ("sharing_policy", "port", "host", "ae_title", "dicomweb_url"):
            batch.drop_column(column)
