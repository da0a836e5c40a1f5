"""CDS Hooks 2.0 shapes: discovery, the service response (cards, suggestions, actions, links,
override reasons) and feedback, as the specification names their fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Coding(BaseModel):
    system: str | None = None
    code: str
    display: str | None = None


class Service(BaseModel):
    hook: str
    title: str | None = None
    description: str
    id: str
    prefetch: dict[str, str] | None = None
    usageRequirements: str | None = None  # noqa: N815 - the specification's field name


class Discovery(BaseModel):
    services: list[Service]


class Source(BaseModel):
    label: str
    url: str | None = None
    topic: Coding | None = None


class Action(BaseModel):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: str | None = None  # noqa: N815


class Suggestion(BaseModel):
    label: str
    uuid: str | None = None
    isRecommended: bool | None = None  # noqa: N815
    actions: list[Action] | None = None


class Link(BaseModel):
    label: str
    url: str
    type: Literal["absolute", "smart"]
    appContext: str | None = None  # noqa: N815


class Card(BaseModel):
    uuid: str | None = None
    summary: str = Field(max_length=140)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None  # noqa: N815
    overrideReasons: list[Coding] | None = None  # noqa: N815
    links: list[Link] | None = None


class CdsResponse(BaseModel):
    cards: list[Card]
    systemActions: list[Action] | None = None  # noqa: N815


class FeedbackAnswer(BaseModel):
    """What the feedback endpoint did with the entries it accepted."""

    recorded: int
    repeats_avoided: int
