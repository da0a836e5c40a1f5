"""Index: ReferringPhysicianName's Ideographic and Phonetic component groups, matched.

The study row kept the Alphabetic group of ReferringPhysicianName alone (`referring_physician`),
so a query for 山田* found no study referred by `Yamada^Tarou=山田^太郎`, while PatientName was
matched in every group (0012). Each other group now has a column of its own, casefolded as the
Alphabetic one is. Not indexed, as `referring_physician` never was: it narrows a query that
other keys select, and an index per group would cost every ingest for a rare query.

Expand only (new columns with defaults): nodes of the previous version keep serving while it
runs; studies they write meanwhile have empty new columns until sent again.

Existing rows are filled from their stored study-level JSON; only studies whose JSON names an
Ideographic or Phonetic group are read.

Revision ID: 0013_referring_pn_groups
Revises: 0012_pn_groups
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013_referring_pn_groups"
down_revision = "0012_pn_groups"
branch_labels = None
depends_on = None

_BATCH = 1000
_REFERRING = "00080090"
_NEW = ("referring_physician_ideographic", "referring_physician_phonetic")


# The normalisation of this release (broker/dicom/json_model.py casefold_pn), copied so that
# what this migration writes does not change with later releases of that module.
def _casefold(name: str) -> str:
    return name.rstrip("^ ").casefold()


def _other_groups(study_json: str) -> tuple[str, str] | None:
    try:
        value = (json.loads(study_json).get(_REFERRING) or {}).get("Value") or [None]
    except (ValueError, AttributeError, TypeError):
        return None
    first = value[0]
    if not isinstance(first, dict):
        return None
    i, p = (first.get(g) if isinstance(first.get(g), str) else "" for g in ("Ideographic", "Phonetic"))
    return str(i), str(p)


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        for column in _NEW:
            batch.add_column(sa.Column(column, sa.String(length=256), nullable=False, server_default=""))
    _fill(op.get_bind())


def _fill(bind: sa.Connection) -> None:
    study = sa.table(
        "study",
        sa.column("pk", sa.Integer),
        sa.column("study_json", sa.Text),
        *(sa.column(c, sa.String) for c in _NEW),
    )
    last = 0
    while True:
        rows = bind.execute(
            sa.select(study.c.pk, study.c.study_json)
            .where(
                study.c.pk > last,
                study.c.study_json.like(f'%"{_REFERRING}"%'),
                sa.or_(study.c.study_json.like('%"Ideographic"%'), study.c.study_json.like('%"Phonetic"%')),
            )
            .order_by(study.c.pk)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        updates: list[dict[str, Any]] = []
        for row in rows:
            groups = _other_groups(row.study_json)
            if groups and any(groups):
                columns = {f"b_{c}": _casefold(g)[:256] for c, g in zip(_NEW, groups, strict=True)}
                updates.append({"b_pk": row.pk, **columns})
        if updates:
            bind.execute(
                study.update()
                .where(study.c.pk == sa.bindparam("b_pk"))
                .values({c: sa.bindparam(f"b_{c}") for c in _NEW}),
                updates,
            )
        last = rows[-1].pk


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        for column in _NEW:
            batch.drop_column(column)
