"""DIMSE peers: the network (CIDR) each registered calling AE title may call the broker from.

NULL means loopback only (127.0.0.0/8 and ::1): a calling AE registered before this revision
keeps working from the broker's own host and must be given its network to call from elsewhere.

Revision ID: 0010_dimse_peers
Revises: 0009_h41_imports
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_dimse_peers"
down_revision = "0009_h41_imports"
branch_labels = None
depends_on = "0003_federation"  # facility_ae is created there


def upgrade() -> None:
    with op.batch_alter_table("facility_ae") as batch:
        batch.add_column(sa.Column("network", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("facility_ae") as batch:
        batch.drop_column("network")
