"""PostgreSQL: indexes that serve prefix wildcards (`DOE*` -> LIKE 'doe%').

PostgreSQL's default btree indexes cannot serve LIKE under a non-C collation; the
*_pattern_ops variants can. SQLite gets the same from `PRAGMA case_sensitive_like=ON`.

Revision ID: 0004_pg_pattern_indexes
Revises: 0001_core
"""

from alembic import op

revision = "0004_pg_pattern_indexes"
down_revision = "0001_core"
branch_labels = ("core_pg",)
depends_on = None

_INDEXES = {
    "ix_study_name_norm_pat": ("study", "name_norm"),
    "ix_study_name_fuzzy_pat": ("study", "name_fuzzy"),
    "ix_study_patient_id_pat": ("study", "patient_id"),
    "ix_study_accession_pat": ("study", "accession_number"),
    "ix_patient_name_norm_pat": ("patient", "name_norm"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, (table, column) in _INDEXES.items():
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column} varchar_pattern_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in _INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
