"""Index: the object's own IssuerOfPatientID beside the issuer the broker qualifies its ID with.

QIDO-RS and C-FIND match IssuerOfPatientID against either and answer the object's own value;
`issuer` stays the broker's qualification (an unregistered issuer never links patients).
Existing rows take the value from their stored study-level JSON.

Revision ID: 0006_study_issuer_in_data
Revises: 0004_pg_pattern_indexes
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0006_study_issuer_in_data"
down_revision = "0004_pg_pattern_indexes"
branch_labels = None
depends_on = None

_ISSUER = "00100021"
_BATCH = 1000


def _own_issuer(study_json: str) -> str:
    try:
        element = json.loads(study_json).get(_ISSUER) or {}
        values = element.get("Value") or [""]
        return str(values[0] or "").strip()[:64]
    except (ValueError, AttributeError, TypeError):
        return ""


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("issuer_in_data", sa.String(length=64), nullable=False, server_default=""))
    bind = op.get_bind()
    study = sa.table(
        "study", sa.column("pk", sa.Integer), sa.column("study_json", sa.Text), sa.column("issuer_in_data")
    )
    last = 0
    while True:
        rows = bind.execute(
            sa.select(study.c.pk, study.c.study_json)
            .where(study.c.pk > last, study.c.study_json.like(f'%"{_ISSUER}"%'))
            .order_by(study.c.pk)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        updates = [{"b_pk": pk, "v": v} for pk, text in rows if (v := _own_issuer(text))]
        if updates:
            bind.execute(
                study.update()
                .where(study.c.pk == sa.bindparam("b_pk"))
                .values(issuer_in_data=sa.bindparam("v")),
                updates,
            )
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_column("issuer_in_data")
