"""Identity: a record's other names (a PatientName's Ideographic and Phonetic groups), searched.

The MPI kept a record's name from the PatientName's Alphabetic group alone, so PDQm's
`family=山田` and the lookup page's search by 山田 or やまだ did not find the patient
`Yamada^Tarou=山田^太郎=やまだ^たろう`. `identity_name` keeps the (family, given) of those groups,
normalised as the record's own name is, one row per group, for records that have them: searched,
never compared when linking (matching and blocking keys are unchanged).

Expand only (a new table): nodes of the previous version keep serving while it runs; a record
they create meanwhile gets its other names when its patient is sent again.

Existing records are filled from the index's patient row they mirror (`patient_pk`), whose
`patient_name` keeps every group since 0012: only patients whose name has a second group are
read.

Revision ID: 0013_identity_names
Revises: 0005_identity_settings
Depends on: 0012_pn_groups (patient_name with every group)
"""

import re
import unicodedata
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013_identity_names"
down_revision = "0005_identity_settings"
branch_labels = None
depends_on = "0012_pn_groups"

_BATCH = 1000

# The normalisation of this release (broker/identity/matching.py: normalize_name_part,
# _split_name, other_names), copied so that what this migration writes does not change with
# later releases of that module.
_PLACEHOLDER_NAMES = frozenset(
    {
        "UNKNOWN",
        "UNK",
        "ANONYMOUS",
        "ANON",
        "NONE",
        "NULL",
        "NA",
        "N A",
        "TEST",
        "PATIENT",
        "NONAME",
        "X",
        "XX",
        "XXX",
        "NN",
        "BABY",
        "DOE",
    }
)
_NON_NAME = re.compile(r"[^A-Z' -]")
_SPACES = re.compile(r"\s+")


# Blocks of Latin letters, IPA and modifier letters, letter-like symbols and number forms,
# full-width ASCII: characters the Latin rule has always read (most to nothing).
_LATIN_BLOCKS = (
    (0x0000, 0x0370),
    (0x1D00, 0x1F00),
    (0x2000, 0x2C00),
    (0x2C60, 0x2C80),
    (0xA720, 0xA800),
    (0xAB30, 0xAB70),
    (0xFB00, 0xFB07),
    (0xFF00, 0xFF5F),
)


def _script(c: str, current: str) -> str:
    """Which rule a character of a name takes: "latin" (Latin letters and everything that is no
    letter: digits, spaces, symbols), "greek", or "other"; a mark takes its letter's."""
    category = unicodedata.category(c)
    if category.startswith("M"):
        return current
    code = ord(c)
    if not category.startswith("L") or any(lo <= code < hi for lo, hi in _LATIN_BLOCKS):
        return "latin"
    name = unicodedata.name(c, "")
    if name.startswith("LATIN"):
        return "latin"
    return "greek" if name.startswith("GREEK") else "other"


def _name_upper(text: str) -> str:
    """A name upper-cased for matching. Latin as it always was: ASCII after NFKD (MÜLLER ->
    MULLER; a letter with no ASCII form, Ø or Ł, is dropped as before), so nothing changes for
    a Latin name. Letters of other scripts are kept, in their NFKC form (ﾔﾏﾀﾞ is ヤマダ) and
    upper-cased where the script has case. Greek loses its accents as Latin does (Greek capitals
    are written without tonos); every other script keeps its marks (ダ is not タ, शर्मा keeps
    its vowel signs). Before, every non-Latin letter was dropped: ИВАНОВ, 王 or 김 had no name."""
    if text.isascii():
        return text.upper()
    runs: list[tuple[str, list[str]]] = []
    for c in text:
        script = _script(c, runs[-1][0] if runs else "latin")
        if runs and runs[-1][0] == script:
            runs[-1][1].append(c)
        else:
            runs.append((script, [c]))
    out = []
    for script, chars in runs:
        run = "".join(chars)
        if script == "latin":
            out.append(unicodedata.normalize("NFKD", run).encode("ascii", "ignore").decode("ascii"))
        elif script == "greek":
            decomposed = unicodedata.normalize("NFKD", run)
            out.append("".join(c for c in decomposed if not unicodedata.combining(c)))
        else:
            out.append(unicodedata.normalize("NFKC", run))
    return "".join(out).upper()


def _is_name_char(c: str) -> bool:
    """A letter of any script, or a mark on one (Devanagari vowel signs are marks)."""
    return c.isalpha() or unicodedata.category(c).startswith("M")


def _normalize_name_part(text: str | None) -> str:
    if not text:
        return ""
    raw = _name_upper(str(text))
    # A name made of digits or symbols is garbage, not a name with the junk stripped off.
    letters = sum(_is_name_char(c) for c in raw)
    if letters == 0 or letters < len(raw.replace(" ", "")) / 2:
        return ""
    if raw.isascii():
        kept = _NON_NAME.sub(" ", raw)
    else:
        kept = "".join(c if _is_name_char(c) or c in "' -" else " " for c in raw)
    cleaned = _SPACES.sub(" ", kept).strip(" -'")
    cleaned = cleaned.replace("'", "")
    if not cleaned or cleaned in _PLACEHOLDER_NAMES:
        return ""
    return cleaned[:128]


def _split_name(group: str) -> tuple[str, str, str]:
    if "^" in group:
        parts = group.split("^")
    elif "," in group:  # "FAMILY, GIVEN" from systems that ignore PN rules
        parts = [p.strip() for p in group.split(",", 1)]
    else:
        parts = [group]
    parts += [""] * (3 - len(parts))
    family, given, middle = (_normalize_name_part(p) for p in parts[:3])
    if given and not middle and " " in given:
        given, middle = given.split(" ", 1)
    return family, given, middle


def _other_names(pn: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for group in pn.split("=")[1:3]:
        family, given, _middle = _split_name(group)
        if (family or given) and (family, given) not in out:
            out.append((family, given))
    return out


def upgrade() -> None:
    op.create_table(
        "identity_name",
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("family", sa.String(length=128), nullable=False),
        sa.Column("given", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("record_id", "family", "given"),
    )
    op.create_index("ix_identity_name_family", "identity_name", ["family"])
    op.create_index("ix_identity_name_given", "identity_name", ["given"])
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # As 0004: btree indexes serve LIKE 'prefix%' under a non-C collation only with these.
        for column in ("family", "given"):
            op.execute(
                f"CREATE INDEX IF NOT EXISTS ix_identity_name_{column}_pat"
                f" ON identity_name ({column} varchar_pattern_ops)"
            )
    _fill(bind)


def _fill(bind: sa.Connection) -> None:
    record = sa.table("identity_record", sa.column("id", sa.Integer), sa.column("patient_pk", sa.Integer))
    patient = sa.table("patient", sa.column("pk", sa.Integer), sa.column("patient_name", sa.String))
    name = sa.table(
        "identity_name",
        sa.column("record_id", sa.Integer),
        sa.column("family", sa.String),
        sa.column("given", sa.String),
    )
    last = 0
    while True:
        rows = bind.execute(
            sa.select(record.c.id, patient.c.patient_name)
            .join(patient, patient.c.pk == record.c.patient_pk)
            .where(record.c.id > last, patient.c.patient_name.like("%=%"))
            .order_by(record.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        inserts: list[dict[str, Any]] = [
            {"record_id": row.id, "family": family, "given": given}
            for row in rows
            for family, given in _other_names(row.patient_name)
        ]
        if inserts:
            bind.execute(name.insert(), inserts)
        last = rows[-1].id


def downgrade() -> None:
    op.drop_index("ix_identity_name_given", table_name="identity_name")
    op.drop_index("ix_identity_name_family", table_name="identity_name")
    op.drop_table("identity_name")
