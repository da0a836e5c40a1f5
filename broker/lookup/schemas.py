"""Shapes of the relevance engine: what it is given (a planned exam, a prior's facts, the setting,
the look-back windows) and what it answers (an interpretation of an exam, a verdict per prior)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

from broker.errors import BadRequest


class Setting(StrEnum):
    """The clinical setting of the order; it picks the look-back window."""

    TRAUMA = "trauma"
    ED = "ed"
    INPATIENT = "inpatient"
    OUTPATIENT = "outpatient"

    @classmethod
    def parse(cls, value: str | Setting) -> Setting:
        if isinstance(value, Setting):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise BadRequest(f"Unknown clinical setting {value!r}; expected one of: {allowed}") from None


@dataclass(frozen=True)
class Windows:
    """Look-back window per setting, in days: a prior at most this old is `in_window`.

    The defaults and their sources live in data/rules.toml (`vocabulary.default_windows()`)."""

    trauma: int
    ed: int
    inpatient: int
    outpatient: int

    def __post_init__(self) -> None:
        for name in ("trauma", "ed", "inpatient", "outpatient"):
            days = getattr(self, name)
            if isinstance(days, bool) or not isinstance(days, int) or days < 0:
                raise BadRequest(f"Look-back window for {name} must be a whole number of days >= 0")

    def days(self, setting: Setting) -> int:
        return int(getattr(self, setting.value))


@dataclass(frozen=True)
class ProcedureCode:
    """One item of a study's ProcedureCodeSequence (or an order's code).

    scheme: DICOM CodingSchemeDesignator when known (C4/CPT, LN, RADLEX ...)."""

    value: str
    scheme: str | None = None
    meaning: str | None = None


@dataclass(frozen=True)
class SeriesFacts:
    """What the index knows of one series of a prior; every field may be unknown."""

    modality: str | None = None
    description: str | None = None
    body_part_examined: str | None = None
    laterality: str | None = None
    slice_thickness_mm: float | None = None
    number_of_instances: int | None = None
    expected_instances: int | None = None
    contrast_agent: str | None = None


@dataclass(frozen=True)
class PriorFacts:
    """A prior study as the index will describe it (study level plus per-series facts)."""

    study_date: date | None
    modalities: tuple[str, ...] = ()
    study_description: str | None = None
    procedure_codes: tuple[ProcedureCode, ...] = ()
    body_part_examined: str | None = None
    laterality: str | None = None
    series: tuple[SeriesFacts, ...] = ()
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class ExamInterpretation:
    """What an exam really is: its modality family, the regions it targets (paired regions carry
    the exam's laterality), contrast, and how that was decided.

    decided_by: code, code+text, text, procedure_code_meaning, series_description, body_part, none.
    terms: the vocabulary terms read, abbreviations shown with their expansion.
    notes: fallbacks and disagreements (unknown code, BodyPartExamined overruled ...)."""

    modality: str | None
    regions: tuple[str, ...]
    laterality: str | None
    contrast: str | None
    decided_by: str
    purposes: frozenset[str] = frozenset()
    terms: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def is_guidance(self) -> bool:
        return "guidance" in self.purposes

    @property
    def is_dxa(self) -> bool:
        return self.modality == "DXA" or "dxa" in self.purposes


@dataclass(frozen=True)
class Usability:
    """Whether the prior can serve the purpose, beyond being relevant: unknown is None."""

    thin_slices: bool | None
    contrast: str | None
    phases: tuple[str, ...]
    contrast_matches_planned: bool | None
    series_complete: bool | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overlap:
    """One planned region met by one region the prior covers."""

    planned: str
    prior: str
    relation: str  # equal, prior_contains, planned_contains
    implied: bool  # the prior covers the region only through implied coverage (a trunk CT's spine)


@dataclass(frozen=True)
class Verdict:
    """The engine's answer for one prior: relevant (the list), in_window (the order-time warning),
    the rule that decided and the reasons, in words a clinician can check."""

    relevant: bool
    in_window: bool
    rule: str
    reasons: tuple[str, ...]
    prior: ExamInterpretation
    usability: Usability
    overlaps: tuple[Overlap, ...] = ()
    age_days: int | None = None
    window_days: int = 0
    versions: dict[str, str] = field(default_factory=dict)
