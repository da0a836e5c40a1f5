"""Identity (MPI): persons, identifier records, blocking keys, links, review queue, model parameters.

Revision ID: 0002_identity
Revises: 0001_core
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_identity"
down_revision = "0001_core"
branch_labels = ("identity",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_person",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "identity_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("issuer", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=True),
        sa.Column("patient_pk", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("family", sa.String(length=128), nullable=False),
        sa.Column("given", sa.String(length=128), nullable=False),
        sa.Column("middle", sa.String(length=128), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=False),
        sa.Column("sex", sa.String(length=1), nullable=False),
        sa.Column("address", sa.String(length=512), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=False),
        sa.Column("merged_into", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("issuer", "value", name="uq_identity_record_issuer_value"),
    )
    op.create_index("ix_identity_record_person", "identity_record", ["person_id"])
    op.create_index("ix_identity_record_family", "identity_record", ["family"])
    op.create_index("ix_identity_record_given", "identity_record", ["given"])
    op.create_index("ix_identity_record_patient_pk", "identity_record", ["patient_pk"])
    op.create_table(
        "identity_identifier",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("issuer", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["record_id"], ["identity_record.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("record_id", "issuer", "value", name="uq_identity_identifier"),
    )
    op.create_index("ix_identity_identifier_value", "identity_identifier", ["issuer", "value"])
    op.create_table(
        "identity_block",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "record_id"),
    )
    op.create_index("ix_identity_block_record", "identity_block", ["record_id"])
    op.create_table(
        "identity_trusted_issuer",
        sa.Column("issuer", sa.String(length=128), nullable=False),
        sa.Column("note", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("issuer"),
    )
    op.create_table(
        "identity_link",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("previous_person_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("matched_record_id", sa.Integer(), nullable=True),
        sa.Column("contributions", sa.Text(), nullable=False),
        sa.Column("group_id", sa.String(length=36), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("why", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_identity_link_record", "identity_link", ["record_id", "id"])
    op.create_index("ix_identity_link_group", "identity_link", ["group_id"])
    op.create_table(
        "identity_review",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("candidate_record_id", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("contributions", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=512), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_identity_review_status", "identity_review", ["status", "id"])
    op.create_index("ix_identity_review_record", "identity_review", ["record_id"])
    op.create_table(
        "identity_nolink",
        sa.Column("record_a", sa.Integer(), nullable=False),
        sa.Column("record_b", sa.Integer(), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("why", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("record_a", "record_b"),
    )
    op.create_table(
        "identity_model",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    for table in (
        "identity_model",
        "identity_nolink",
        "identity_review",
        "identity_link",
        "identity_trusted_issuer",
        "identity_block",
        "identity_identifier",
        "identity_record",
        "identity_person",
    ):
        op.drop_table(table)
