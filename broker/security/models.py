"""The security tables: `seen_token_id`, the `jti` of every one-time token accepted (CDS Hooks
clients' JWTs), kept until the token expires, so that a token replayed to any node of the fleet is
refused. Written and read only by broker.security.service."""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel


class SeenTokenId(SQLModel, table=True):
    __tablename__ = "seen_token_id"

    # SHA-256 (hex) of "<issuer> <jti>": fixed width whatever a client puts in its jti, and the
    # issuer keeps two EHRs' jti spaces apart.
    key: str = Field(primary_key=True, max_length=64)
    # Unix seconds: the token's exp plus the clock leeway.
    expires_at: int = Field(sa_type=BigInteger, index=True)
