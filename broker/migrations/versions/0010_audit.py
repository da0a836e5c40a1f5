"""Audit: the append-only, hash-chained audit trail and its one-row chain head.

Revision ID: 0010_audit
Revises: 0009_h41_imports

Triggers refuse UPDATE and DELETE on `audit_event` (and DELETE of the head row) in the database
itself, so that no code path of the broker, and no one with only its ordinary SQL access, rewrites
history without first dropping a trigger (which `scanonce audit verify` then still catches).
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_audit"
down_revision = "0009_h41_imports"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "audit_event",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("recorded", sa.String(32), nullable=False),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("subtype", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(2), nullable=False),
        sa.Column("outcome_desc", sa.String(256), nullable=False, server_default=""),
        sa.Column("agent_who", sa.String(256), nullable=False, server_default=""),
        sa.Column("agent_role", sa.String(32), nullable=False, server_default=""),
        sa.Column("agent_facility", sa.String(64), nullable=False, server_default=""),
        sa.Column("agent_issuer", sa.String(256), nullable=False, server_default=""),
        sa.Column("agent_via", sa.String(16), nullable=False, server_default=""),
        sa.Column("purpose_of_use", sa.String(32), nullable=False, server_default=""),
        sa.Column("patient_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("patient_issuer", sa.String(128), nullable=False, server_default=""),
        sa.Column("study_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("source_node", sa.String(128), nullable=False, server_default=""),
        sa.Column("source_interface", sa.String(16), nullable=False, server_default=""),
        sa.Column("client_address", sa.String(64), nullable=False, server_default=""),
        sa.Column("entity", sa.String(2048), nullable=False, server_default=""),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_event_recorded", "audit_event", ["recorded"])
    op.create_index("ix_audit_event_subtype", "audit_event", ["subtype"])
    op.create_index("ix_audit_event_agent_who", "audit_event", ["agent_who"])
    op.create_index("ix_audit_event_patient_id", "audit_event", ["patient_id"])
    op.create_index("ix_audit_event_study_uid", "audit_event", ["study_uid"])
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.execute(f"INSERT INTO audit_chain_head (id, seq, hash) VALUES (1, 0, '{GENESIS}')")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'the audit trail is append-only (% on %)', TG_OP, TG_TABLE_NAME; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event "
            "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_chain_head "
            "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
        )
    else:
        for name, operation, table in (
            ("audit_event_no_update", "UPDATE", "audit_event"),
            ("audit_event_no_delete", "DELETE", "audit_event"),
            ("audit_head_no_delete", "DELETE", "audit_chain_head"),
        ):
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {operation} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE audit_chain_head")
        op.execute("DROP TABLE audit_event")
        op.execute("DROP FUNCTION audit_append_only()")
    else:
        op.drop_table("audit_chain_head")
        op.drop_table("audit_event")
