"""Jobs at scale: `run_after`, when a job queued again after a transient failure is due.

Expand only (a nullable column): nodes of the previous version keep serving while it is added;
they ignore the column, so a job they claim runs at once instead of after its backoff.

Revision ID: 0010_jobs_lease
Revises: 0009_h41_imports
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_jobs_lease"
down_revision = "0009_h41_imports"
branch_labels = None
depends_on = "0003_federation"  # the job table is created there


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("run_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("run_after")
