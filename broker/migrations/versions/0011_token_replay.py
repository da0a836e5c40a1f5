"""Token replay across nodes: `seen_token_id`, the jti of each one-time token accepted (CDS Hooks
clients' JWTs) until it expires. Per process, a token replayed to another node was accepted.

Expand only (a new table): nodes of the previous version keep serving while it is added (they
keep their per-process check).

Revision ID: 0011_token_replay
Revises: 0010_audit
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_token_replay"
down_revision = "0010_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seen_token_id",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    # The purge deletes by expiry: a range scan, not a table scan.
    op.create_index("ix_seen_token_id_expires_at", "seen_token_id", ["expires_at"])


def downgrade() -> None:
    op.drop_table("seen_token_id")
