"""The audit tables. Rows of `audit_event` are never updated or deleted (database triggers refuse
it, migration 0010_audit); `audit_chain_head` is one row, the last sequence number and hash, which
every writer locks first so that appends from any number of threads and processes serialise."""

from __future__ import annotations

from sqlmodel import Field, SQLModel


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"

    seq: int = Field(primary_key=True)  # 1, 2, 3, ... without gaps: the chain's order
    recorded: str = Field(max_length=32, index=True)  # ISO 8601 UTC, microseconds, "Z"
    action: str = Field(max_length=1)  # C R U D E (FHIR AuditEvent.action)
    subtype: str = Field(max_length=32, index=True)  # query, read, retrieve, store, import, link, ...
    outcome: str = Field(max_length=2)  # 0 success, 4 minor, 8 serious, 12 major failure
    outcome_desc: str = Field(default="", max_length=256)
    agent_who: str = Field(default="", max_length=256, index=True)
    agent_role: str = Field(default="", max_length=32)
    agent_facility: str = Field(default="", max_length=64)
    agent_issuer: str = Field(default="", max_length=256)
    agent_via: str = Field(default="", max_length=16)
    purpose_of_use: str = Field(default="", max_length=32)
    patient_id: str = Field(default="", max_length=128, index=True)
    patient_issuer: str = Field(default="", max_length=128)
    study_uid: str = Field(default="", max_length=64, index=True)
    source_node: str = Field(default="", max_length=128)
    source_interface: str = Field(default="", max_length=16)
    client_address: str = Field(default="", max_length=64)
    entity: str = Field(default="", max_length=2048)  # what was asked: path and query, identifier keys
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditChainHead(SQLModel, table=True):
    __tablename__ = "audit_chain_head"

    id: int = Field(primary_key=True)  # always 1
    seq: int = 0
    hash: str = Field(max_length=64)
