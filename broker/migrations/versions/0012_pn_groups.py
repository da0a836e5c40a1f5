"""Index: PatientName's Ideographic and Phonetic component groups, matched and answered.

Until now the patient and study rows kept the Alphabetic group alone: a query for 山田* or
やまだ* found nothing, and patient-level answers (C-FIND PATIENT root) lost every other group.
Each row now keeps the whole name in `patient_name` (`Yamada^Tarou=山田^太郎=やまだ^たろう`) and
each group normalised in a column of its own, so matching any group is an index prefix scan.
`name_fuzzy` is folded as `json_model.fuzzy_pn` now folds it (NFKC: half-width katakana as
full-width; accents stripped from Latin and Greek letters only, so ダ stays ダ).

Expand only (new columns with defaults): nodes of the previous version keep serving while it
runs; the rows they write meanwhile have empty new columns, which `scanonce db upgrade` run
again after the last old node stops does not revisit (run this once all nodes are upgraded).

Existing rows are filled from what the index already holds: a study from its stored study-level
JSON; a patient from its newest study whose Alphabetic group is the patient's name (else it keeps
its Alphabetic group alone). Only rows that can change are read: names with another group, or
whose fuzzy form differs from the casefolded one (non-ASCII names); ASCII names fold as before.

Revision ID: 0012_pn_groups
Revises: 0009_h41_imports
"""

import json
import unicodedata
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0012_pn_groups"
down_revision = "0009_h41_imports"
branch_labels = None
depends_on = None

_BATCH = 1000
_NAME = "00100010"
_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_NEW = ("name_ideographic", "name_ideographic_fuzzy", "name_phonetic", "name_phonetic_fuzzy")
_PG_PATTERN = {
    "ix_study_name_ideographic_pat": ("study", "name_ideographic"),
    "ix_study_name_ideographic_fuzzy_pat": ("study", "name_ideographic_fuzzy"),
    "ix_study_name_phonetic_pat": ("study", "name_phonetic"),
    "ix_study_name_phonetic_fuzzy_pat": ("study", "name_phonetic_fuzzy"),
    "ix_patient_name_ideographic_pat": ("patient", "name_ideographic"),
    "ix_patient_name_phonetic_pat": ("patient", "name_phonetic"),
}


# The normalisation of this release (broker/dicom/json_model.py), copied so that what this
# migration writes does not change with later releases of that module.
def _casefold(name: str) -> str:
    return name.rstrip("^ ").casefold()


def _drops_marks(base: str) -> bool:
    if base < "\u0080" or unicodedata.combining(base):
        return True
    return unicodedata.name(base, "").startswith(("LATIN", "GREEK"))


def _fuzzy(name: str) -> str:
    folded = _casefold(name)
    if folded.isascii():
        return folded
    out = []
    for ch in unicodedata.normalize("NFKC", folded):
        decomposed = unicodedata.normalize("NFKD", ch)
        out.append(
            "".join(c for c in decomposed if not unicodedata.combining(c))
            if _drops_marks(decomposed[0])
            else ch
        )
    return "".join(out)


def _groups_of_json(study_json: str) -> tuple[str, str, str] | None:
    try:
        value = (json.loads(study_json).get(_NAME) or {}).get("Value") or [None]
    except (ValueError, AttributeError, TypeError):
        return None
    first = value[0]
    if not isinstance(first, dict):
        return None
    a, i, p = (first.get(g) if isinstance(first.get(g), str) else "" for g in _GROUPS)
    return str(a), str(i), str(p)


def _columns(groups: tuple[str, str, str]) -> dict[str, Any]:
    a, i, p = groups
    parts = list(groups)
    while parts and not parts[-1]:
        parts.pop()
    return {
        "patient_name": "=".join(parts),
        "name_norm": _casefold(a),
        "name_fuzzy": _fuzzy(a),
        "name_ideographic": _casefold(i),
        "name_ideographic_fuzzy": _fuzzy(i),
        "name_phonetic": _casefold(p),
        "name_phonetic_fuzzy": _fuzzy(p),
    }


_COLUMNS = ("patient_name", "name_norm", "name_fuzzy", *_NEW)


def _table(name: str) -> sa.TableClause:
    return sa.table(
        name,
        sa.column("pk", sa.Integer),
        *(sa.column(c, sa.String) for c in _COLUMNS),
        *((sa.column("study_json", sa.Text), sa.column("patient_pk", sa.Integer)) if name == "study" else ()),
    )


def _update(bind: sa.Connection, table: sa.TableClause, updates: list[dict[str, Any]]) -> None:
    if updates:
        bind.execute(
            table.update()
            .where(table.c.pk == sa.bindparam("b_pk"))
            .values({c: sa.bindparam(f"b_{c}") for c in _COLUMNS}),
            updates,
        )


def _row(pk: int, columns: dict[str, Any]) -> dict[str, Any]:
    return {"b_pk": pk, **{f"b_{c}": v for c, v in columns.items()}}


def upgrade() -> None:
    for table in ("patient", "study"):
        with op.batch_alter_table(table) as batch:
            for column in _NEW:
                batch.add_column(sa.Column(column, sa.String(length=256), nullable=False, server_default=""))
    op.create_index("ix_patient_name_ideographic", "patient", ["name_ideographic"])
    op.create_index("ix_patient_name_phonetic", "patient", ["name_phonetic"])
    for column in _NEW:
        op.create_index(f"ix_study_{column}", "study", [column])
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # As 0004: btree indexes serve LIKE 'prefix%' under a non-C collation only with these.
        for name, (table, column) in _PG_PATTERN.items():
            op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column} varchar_pattern_ops)")
    _fill(bind)


def _fill(bind: sa.Connection) -> None:
    study, patient = _table("study"), _table("patient")
    # Per patient: the groups of its newest study named as the patient is (study pk, groups).
    named: dict[int, tuple[int, tuple[str, str, str]]] = {}
    last = 0
    while True:
        rows = bind.execute(
            sa.select(study.c.pk, study.c.patient_pk, study.c.study_json, *(study.c[c] for c in _COLUMNS))
            .where(
                study.c.pk > last,
                sa.or_(
                    study.c.study_json.like('%"Ideographic"%'),
                    study.c.study_json.like('%"Phonetic"%'),
                    study.c.name_fuzzy != study.c.name_norm,
                ),
            )
            .order_by(study.c.pk)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        updates = []
        for row in rows:
            groups = _groups_of_json(row.study_json)
            if groups is None or groups[0] != row.patient_name.split("=", 1)[0]:
                groups = (row.patient_name.split("=", 1)[0], "", "")  # the JSON says otherwise: as was
            columns = _columns(groups)
            if any(getattr(row, c) != v for c, v in columns.items()):
                updates.append(_row(row.pk, columns))
            named[row.patient_pk] = (row.pk, groups)
        _update(bind, study, updates)
        last = rows[-1].pk
    last = 0
    while True:
        rows = bind.execute(
            sa.select(patient.c.pk, *(patient.c[c] for c in _COLUMNS))
            .where(patient.c.pk > last, patient.c.name_fuzzy != patient.c.name_norm)
            .order_by(patient.c.pk)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        updates = []
        for row in rows:
            columns = _columns(_patient_groups(row.pk, row.patient_name, named))
            if any(getattr(row, c) != v for c, v in columns.items()):
                updates.append(_row(row.pk, columns))
        _update(bind, patient, updates)
        last = rows[-1].pk
    # Patients whose name is plain ASCII but whose studies carry other groups.
    rest = [pk for pk, (_s, groups) in named.items() if groups[1] or groups[2]]
    for start in range(0, len(rest), _BATCH):
        rows = bind.execute(
            sa.select(patient.c.pk, *(patient.c[c] for c in _COLUMNS)).where(
                patient.c.pk.in_(rest[start : start + _BATCH])
            )
        ).all()
        updates = []
        for row in rows:
            columns = _columns(_patient_groups(row.pk, row.patient_name, named))
            if any(getattr(row, c) != v for c, v in columns.items()):
                updates.append(_row(row.pk, columns))
        _update(bind, patient, updates)


def _patient_groups(
    pk: int, patient_name: str, named: dict[int, tuple[int, tuple[str, str, str]]]
) -> tuple[str, str, str]:
    alphabetic = patient_name.split("=", 1)[0]
    found = named.get(pk)
    if found is not None and found[1][0] == alphabetic:
        return found[1]
    return alphabetic, "", ""


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for name in _PG_PATTERN:
            op.execute(f"DROP INDEX IF EXISTS {name}")
    for column in _NEW:
        op.drop_index(f"ix_study_{column}", table_name="study")
    op.drop_index("ix_patient_name_phonetic", table_name="patient")
    op.drop_index("ix_patient_name_ideographic", table_name="patient")
    # The previous release's reading of the rows: the Alphabetic group alone in patient_name.
    for name in ("patient", "study"):
        first_group = (
            "substr(patient_name, 1, instr(patient_name, '=') - 1)"
            if bind.dialect.name == "sqlite"
            else "split_part(patient_name, '=', 1)"
        )
        bind.execute(sa.text(f"UPDATE {name} SET patient_name = {first_group} WHERE patient_name LIKE '%=%'"))
        with op.batch_alter_table(name) as batch:
            for column in _NEW:
                batch.drop_column(column)
