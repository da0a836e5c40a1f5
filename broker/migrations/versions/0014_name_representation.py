"""Identity: which representation each other name is in; pattern indexes on a record's own name.

`identity_name` kept a record's ideographic and phonetic names (a PatientName's Ideographic and
Phonetic groups, a FHIR feed's IDE and SYL HumanNames, HL7 XPN.8 I and P) without saying which
was which, so a FHIR read could not give back the names only a feed had sent. `representation`
says it: IDE or SYL, the ISO 21090 code the FHIR Patient shows it with.

Existing rows are given the representation of the group of the record's index patient row
(`patient_pk`; its `patient_name` keeps every group since 0012) that reads as the same (family,
given): those are the rows a header wrote, and a feed's row that a header names too. The others
(written from a feed alone) keep "": they are searched as before and not shown by a FHIR read
until the next feed message naming them, which writes them again with their representation.

PostgreSQL: PDQm and the lookup page match a record's own family and given by prefix
(`LIKE 'YAM%'`, queries._name_starts); its btree indexes serve LIKE under a non-C collation only
with varchar_pattern_ops, as 0004 and 0013 give the other name columns. SQLite needs none: its
plain indexes serve a bound prefix pattern under `PRAGMA case_sensitive_like=ON`.

Expand only (a column with a default, indexes): nodes of the previous version keep serving
while it runs; the rows they write meanwhile have "" until their patient is sent again.

Revision ID: 0014_name_representation
Revises: 0013_identity_names
"""

import importlib.util
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0014_name_representation"
down_revision = "0013_identity_names"
branch_labels = None
depends_on = None

_BATCH = 1000
_PATTERN_INDEXES = {
    "ix_identity_record_family_pat": ("identity_record", "family"),
    "ix_identity_record_given_pat": ("identity_record", "given"),
}


def _rows_0013_wrote() -> Any:
    """0013's copy of the name normalisation: the rows to recognise were written with it (0013,
    and this release's broker/identity/matching.py, which it copies), and a migration's copy
    never changes; loaded from its file rather than copied a second time."""
    path = Path(__file__).with_name("0013_identity_names.py")
    spec = importlib.util.spec_from_file_location("scanonce_migration_0013_identity_names", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    with op.batch_alter_table("identity_name") as batch:
        batch.add_column(sa.Column("representation", sa.String(length=3), nullable=False, server_default=""))
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for name, (table, column) in _PATTERN_INDEXES.items():
            op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column} varchar_pattern_ops)")
    _fill(bind)


def _fill(bind: sa.Connection) -> None:
    split_name = _rows_0013_wrote()._split_name
    record = sa.table("identity_record", sa.column("id", sa.Integer), sa.column("patient_pk", sa.Integer))
    patient = sa.table("patient", sa.column("pk", sa.Integer), sa.column("patient_name", sa.String))
    name = sa.table(
        "identity_name",
        sa.column("record_id", sa.Integer),
        sa.column("family", sa.String),
        sa.column("given", sa.String),
        sa.column("representation", sa.String),
    )
    last = 0
    while True:
        rows = bind.execute(
            sa.select(record.c.id, patient.c.patient_name)
            .join(patient, patient.c.pk == record.c.patient_pk)
            .where(
                record.c.id > last,
                patient.c.patient_name.like("%=%"),
                record.c.id.in_(sa.select(name.c.record_id)),
            )
            .order_by(record.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        updates: list[dict[str, Any]] = []
        for row in rows:
            named: dict[tuple[str, str], str] = {}
            for group, code in zip(row.patient_name.split("=")[1:3], ("IDE", "SYL"), strict=False):
                family, given, _middle = split_name(group)
                if family or given:
                    named.setdefault((family, given), code)
            updates += [
                {"b_record_id": row.id, "b_family": f, "b_given": g, "b_representation": code}
                for (f, g), code in named.items()
            ]
        if updates:
            bind.execute(
                name.update()
                .where(
                    name.c.record_id == sa.bindparam("b_record_id"),
                    name.c.family == sa.bindparam("b_family"),
                    name.c.given == sa.bindparam("b_given"),
                )
                .values(representation=sa.bindparam("b_representation")),
                updates,
            )
        last = rows[-1].id


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in _PATTERN_INDEXES:
            op.execute(f"DROP INDEX IF EXISTS {name}")
    with op.batch_alter_table("identity_name") as batch:
        batch.drop_column("representation")
