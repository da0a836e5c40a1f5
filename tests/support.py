"""Helpers shared by tests across domains (one copy each)."""

from __future__ import annotations

from broker.security.schemas import Principal, Role

# The caller of service functions that act for someone, as the embedded default's HTTP caller is.
ADMIN = Principal(who="test", role=Role.admin, facility="local")
