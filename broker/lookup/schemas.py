"""Shapes of the relevance engine: what it is given (a planned exam, a prior's facts, the setting,
the look-back windows) and what it answers (an interpretation of an exam, a verdict per prior)."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import date, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

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
    versions: dict[str, str] = dc_field(default_factory=dict)


# -- the lookup service's answers (the API's response models) --------------------------------------


class DoseOut(BaseModel):
    """One prior's dose: what its records say (DLP, CTDIvol, DAP) and its effective dose, with
    where the numbers came from (`source`: rdsr, image headers ...; `method`)."""

    dlp_mgy_cm: float | None = None
    ctdivol_mgy: float | None = None
    dap_gy_cm2: float | None = None
    effective_dose_msv: float | None = None
    source: str | None = None
    method: str = ""
    age_at_exam_years: float | None = None
    notes: list[str] = []


class UsabilityOut(BaseModel):
    thin_slices: bool | None = None
    contrast: str | None = None
    phases: list[str] = []
    contrast_matches_planned: bool | None = None
    series_complete: bool | None = None
    notes: list[str] = []


class PriorOut(BaseModel):
    study_instance_uid: str
    facility: str
    study_date: date | None = None
    age_days: int | None = None
    modality: str = ""
    modalities: list[str] = []
    description: str = ""
    relevant: bool
    in_window: bool
    rule: str
    reasons: list[str] = []
    usability: UsabilityOut
    dose: DoseOut | None = None
    availability: Literal["ONLINE", "NEARLINE"]
    link: Literal["confirmed", "unconfirmed"]
    link_detail: str = ""


class PlannedOut(BaseModel):
    text: str | None = None
    code: str | None = None
    modality: str | None = None
    regions: list[str] = []
    laterality: str | None = None
    contrast: str | None = None
    decided_by: str = ""
    notes: list[str] = []


class CumulativeOut(BaseModel):
    since: date
    effective_dose_msv: float
    studies_counted: int
    studies_without_estimate: int
    complete: bool


class RepeatCostOut(BaseModel):
    effective_dose_msv: float | None = None
    basis: str  # prior | typical | unknown
    detail: str
    prior_study_instance_uid: str | None = None


class PriorsAnswer(BaseModel):
    """Every study of the person across facilities: relevant first (in the window first among
    them), then the rest, never hidden."""

    patient_found: bool
    setting: str
    window_days: int
    planned: PlannedOut | None = None
    priors: list[PriorOut] = []
    warning: str | None = None
    cumulative_12_months: CumulativeOut | None = None
    repeat_cost: RepeatCostOut | None = None
    notes: list[str] = []
    # Some of the person's records exist but are not shown to this caller (the person's consent,
    # or no treatment purpose of use). Deliberately no count and no facility.
    withheld_by_consent: bool = False


class ExamSuggestion(BaseModel):
    """A planned exam the engine knows by code: its short label (free text the engine reads too)."""

    label: str
    system: str
    code: str


class AvoidedIn(BaseModel):
    study_instance_uid: str = Field(min_length=1, max_length=64)
    planned_exam: str = Field(min_length=1, max_length=256)
    facility: str = Field(min_length=1, max_length=64)


class AvoidedOut(BaseModel):
    id: int
    study_instance_uid: str
    planned_exam: str
    facility: str
    who: str
    estimated_dose_msv: float | None = None
    basis: str
    recorded_at: datetime


class AvoidedMonth(BaseModel):
    facility: str
    month: str  # YYYY-MM
    repeats_avoided: int
    dose_spared_msv: float
