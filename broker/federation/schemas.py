from __future__ import annotations

from pydantic import BaseModel, Field


class FacilityIn(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    issuer: str = Field(min_length=1, max_length=128)
    name: str = Field(default="", max_length=256)


class FacilityOut(BaseModel):
    id: str
    issuer: str
    name: str
