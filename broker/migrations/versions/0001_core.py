"""Core index: facilities, patients, studies, series, instances, conflicts.

Revision ID: 0001_core
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_core"
down_revision = None
branch_labels = ("core",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "facility",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("issuer", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("issuer"),
    )
    op.create_table(
        "instance_conflict",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("object_key", sa.String(length=512), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
    )
    op.create_index(op.f("ix_instance_conflict_sop_uid"), "instance_conflict", ["sop_uid"], unique=False)
    op.create_table(
        "patient",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=128), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("patient_name", sa.String(length=512), nullable=False),
        sa.Column("name_norm", sa.String(length=512), nullable=False),
        sa.Column("name_fuzzy", sa.String(length=512), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=False),
        sa.Column("sex", sa.String(length=16), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["facility_id"],
            ["facility.id"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("issuer", "patient_id", name="uq_patient_issuer_id"),
    )
    op.create_index(op.f("ix_patient_facility_id"), "patient", ["facility_id"], unique=False)
    op.create_index(op.f("ix_patient_name_norm"), "patient", ["name_norm"], unique=False)
    op.create_index(op.f("ix_patient_person_id"), "patient", ["person_id"], unique=False)
    op.create_table(
        "study",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("issuer", sa.String(length=128), nullable=False),
        sa.Column("patient_name", sa.String(length=512), nullable=False),
        sa.Column("name_norm", sa.String(length=512), nullable=False),
        sa.Column("name_fuzzy", sa.String(length=512), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=False),
        sa.Column("sex", sa.String(length=16), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_time", sa.String(length=32), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.String(length=64), nullable=False),
        sa.Column("study_description", sa.String(length=256), nullable=False),
        sa.Column("referring_physician", sa.String(length=256), nullable=False),
        sa.Column("modalities", sa.String(length=256), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("study_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["facility_id"],
            ["facility.id"],
        ),
        sa.ForeignKeyConstraint(
            ["patient_pk"],
            ["patient.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("study_uid"),
    )
    op.create_index("ix_study_accession", "study", ["accession_number"], unique=False)
    op.create_index("ix_study_date", "study", ["study_date"], unique=False)
    op.create_index("ix_study_facility", "study", ["facility_id", "pk"], unique=False)
    op.create_index("ix_study_name_norm", "study", ["name_norm"], unique=False)
    op.create_index("ix_study_name_fuzzy", "study", ["name_fuzzy"], unique=False)
    op.create_index("ix_study_patient_id", "study", ["patient_id"], unique=False)
    op.create_index(op.f("ix_study_patient_pk"), "study", ["patient_pk"], unique=False)
    op.create_table(
        "series",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=256), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("pps_start_date", sa.String(length=8), nullable=False),
        sa.Column("pps_start_time", sa.String(length=32), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("series_json", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["study.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("series_uid"),
    )
    op.create_index("ix_series_modality", "series", ["modality"], unique=False)
    op.create_index("ix_series_study", "series", ["study_pk", "pk"], unique=False)
    op.create_table(
        "instance",
        sa.Column("pk", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("facility_id", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("object_key", sa.String(length=512), nullable=False),
        sa.Column("instance_json", sa.Text(), nullable=False),
        sa.Column("metadata_json", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["facility_id"],
            ["facility.id"],
        ),
        sa.ForeignKeyConstraint(
            ["series_pk"],
            ["series.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["study.pk"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("sop_uid"),
    )
    op.create_index("ix_instance_series", "instance", ["series_pk", "pk"], unique=False)
    op.create_index("ix_instance_study", "instance", ["study_pk", "pk"], unique=False)


def downgrade() -> None:
    for table in ("instance", "series", "study", "patient", "instance_conflict", "facility"):
        op.drop_table(table)
