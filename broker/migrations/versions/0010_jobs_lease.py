"""Jobs at scale: `run_after`, when a job queued again after a transient failure is due; and
`integrity_finding`, the instances `scanonce verify --repair` found missing or changed.

Expand only (a nullable column): nodes of the previous version keep serving while it is added;
they ignore the column, so a job they claim runs at once instead of after its backoff.

Revision ID: 0010_jobs_lease
Revises: 0009_h41_imports, 0003_federation
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_jobs_lease"
# Also on top of the federation branch, which created the job table: a merge point, so that branch
# is no longer a head of its own.
down_revision = ("0009_h41_imports", "0003_federation")
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("run_after", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "integrity_finding",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("facility_id", sa.String(64), nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_integrity_finding_sop_uid", "integrity_finding", ["sop_uid"])


def downgrade() -> None:
    op.drop_table("integrity_finding")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("run_after")
