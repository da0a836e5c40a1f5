"""Lookup: series facts, dose records and the facts-done marker kept by the index, and the
lookup's avoided repeats. Existing studies get their facts from the facts job (queued at start).

Revision ID: 0007_lookup
Revises: 0006_study_issuer_in_data
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_lookup"
down_revision = "0006_study_issuer_in_data"
branch_labels = None
depends_on = "0002_identity"  # identity_review gets an index here


def upgrade() -> None:
    op.create_table(
        "series_facts",
        sa.Column("series_pk", sa.Integer, primary_key=True),
        sa.Column("study_pk", sa.Integer, nullable=False),
        sa.Column("min_slice_thickness_mm", sa.Float, nullable=True),
        sa.Column("contrast_agent", sa.String(64), nullable=False, server_default=""),
        sa.Column("laterality", sa.String(16), nullable=False, server_default=""),
        sa.Column("body_part", sa.String(64), nullable=False, server_default=""),
        sa.Column("instances", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_series_facts_study_pk", "series_facts", ["study_pk"])
    op.create_table(
        "dose_fact",
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        sa.Column("study_pk", sa.Integer, nullable=False),
        sa.Column("record_json", sa.Text, nullable=False),
    )
    op.create_index("ix_dose_fact_study_pk", "dose_fact", ["study_pk"])
    op.create_table(
        "study_facts",
        sa.Column("study_pk", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "lookup_avoided",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("planned_exam", sa.String(256), nullable=False),
        sa.Column("facility_id", sa.String(64), nullable=False),
        sa.Column("who", sa.String(128), nullable=False),
        sa.Column("estimated_dose_msv", sa.Float, nullable=True),
        sa.Column("basis", sa.String(16), nullable=False, server_default="unknown"),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_lookup_avoided_facility_at", "lookup_avoided", ["facility_id", "recorded_at"])
    # The lookup finds open review items naming a person's records on either side.
    op.create_index("ix_identity_review_candidate", "identity_review", ["candidate_record_id"])


def downgrade() -> None:
    op.drop_index("ix_identity_review_candidate", table_name="identity_review")
    op.drop_table("lookup_avoided")
    op.drop_table("study_facts")
    op.drop_table("dose_fact")
    op.drop_table("series_facts")
