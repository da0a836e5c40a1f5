"""DICOM TLS: the client certificate bound to each calling AE title.

`facility_ae.certificate` ("sha256:<fingerprint>" or "subject:<RFC 4514 name>"), NULL for an AE
title no certificate is bound to (as every title before this revision).

Revision ID: 0011_dimse_cert
Revises: 0010_dimse_peers
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_dimse_cert"
down_revision = "0010_dimse_peers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("facility_ae") as batch:
        batch.add_column(sa.Column("certificate", sa.String(512), nullable=True))
        batch.create_index("ix_facility_ae_certificate", ["certificate"])


def downgrade() -> None:
    with op.batch_alter_table("facility_ae") as batch:
        batch.drop_index("ix_facility_ae_certificate")
        batch.drop_column("certificate")
