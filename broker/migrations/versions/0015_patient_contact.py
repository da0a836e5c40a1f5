"""Index: a patient row keeps the address and telephone its newest study's header gave.

Ingest relinked a patient's identity record only when a new study's header changed the name,
birth date or sex, so a patient who moved kept their old address in the MPI forever and was
scored "different address" against their own records elsewhere. The patient row now keeps the
header's PatientAddress and first PatientTelephoneNumbers, so ingest sees a change from the
rows it already reads (no query per instance) and relinks.

Existing rows start with "" (no backfill): the first new study of such a patient that gives an
address or telephone is relinked once through the linker, which leaves the record as it is
when its normalised address and telephone are the stored ones, and brings up to date a record
left with an old address before the upgrade (a copy of the newest study's address would hide
that: it may already be the new one the record never got).

Expand only (columns with a default): nodes of the previous version keep serving while it runs.

Revision ID: 0015_patient_contact
Revises: 0014_name_representation
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_patient_contact"
down_revision = "0014_name_representation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patient") as batch:
        batch.add_column(sa.Column("address", sa.String(length=512), nullable=False, server_default=""))
        batch.add_column(sa.Column("phone", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("patient") as batch:
        batch.drop_column("phone")
        batch.drop_column("address")
