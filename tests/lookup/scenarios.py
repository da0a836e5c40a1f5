"""The labeled scenario set (scenarios.toml) and its scoring, shared by the tests and
bench/lookup_relevance.py."""

from __future__ import annotations

import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from broker.errors import BadRequest
from broker.lookup.relevance import interpret_exam, judge
from broker.lookup.schemas import (
    ExamInterpretation,
    PriorFacts,
    ProcedureCode,
    SeriesFacts,
    Usability,
    Verdict,
)

SCENARIOS = Path(__file__).with_name("scenarios.toml")


@dataclass(frozen=True)
class Case:
    """One (planned exam, prior) pair with its label."""

    scenario: str
    who: str
    setting: str
    planned: dict[str, str | None]
    prior: PriorFacts
    relevant: bool
    in_window: bool
    rule: str
    why: str
    now: date


def _prior(spec: dict[str, Any], now: date) -> PriorFacts:
    mods = spec.get("mod", ())
    return PriorFacts(
        study_date=now - timedelta(days=int(spec["days"])),
        modalities=(mods,) if isinstance(mods, str) else tuple(mods),
        study_description=spec.get("desc"),
        procedure_codes=tuple(ProcedureCode(value=v, scheme=s) for v, s in spec.get("codes", [])),
        body_part_examined=spec.get("bp"),
        laterality=spec.get("lat"),
        series=tuple(
            SeriesFacts(
                modality=s.get("mod"),
                description=s.get("desc"),
                slice_thickness_mm=s.get("thick"),
                number_of_instances=s.get("n"),
                expected_instances=s.get("expected"),
                contrast_agent=s.get("agent"),
            )
            for s in spec.get("series", [])
        ),
    )


def load_cases(path: Path = SCENARIOS) -> tuple[dict[str, Any], list[Case]]:
    doc = tomllib.loads(path.read_text())
    now: date = doc["now"]
    cases = []
    for sc in doc["scenario"]:
        planned = {
            "text": sc.get("planned"),
            "code": sc.get("planned_code"),
            "modality": sc.get("planned_modality"),
            "body_part": sc.get("planned_body_part"),
            "laterality": sc.get("planned_laterality"),
        }
        for p in sc["priors"]:
            cases.append(
                Case(
                    scenario=sc["id"],
                    who=sc["who"],
                    setting=sc["setting"],
                    planned=planned,
                    prior=_prior(p, now),
                    relevant=bool(p["relevant"]),
                    in_window=bool(p["in_window"]),
                    rule=str(p["rule"]),
                    why=str(p["why"]),
                    now=now,
                )
            )
    return doc, cases


def planned_exam(case: Case) -> ExamInterpretation:
    return interpret_exam(**case.planned)


def run(case: Case) -> Verdict:
    """The engine's verdict; a planned exam it cannot read counts as finding nothing relevant."""
    try:
        planned = planned_exam(case)
    except BadRequest as exc:
        nothing = ExamInterpretation(
            modality=None, regions=(), laterality=None, contrast=None, decided_by="none"
        )
        return Verdict(
            relevant=False,
            in_window=False,
            rule="planned_unreadable",
            reasons=(f"planned: {exc.message}", exc.message),
            prior=nothing,
            usability=Usability(None, None, (), None, None),
        )
    return judge(planned, case.prior, setting=case.setting, now=case.now)


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    window_right: int = 0
    rule_right: int = 0
    total: int = 0
    per_rule: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    misses: list[tuple[Case, Verdict]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def score(cases: list[Case]) -> Score:
    s = Score()
    for case in cases:
        verdict = run(case)
        s.total += 1
        kind = ("t" if verdict.relevant == case.relevant else "f") + ("p" if verdict.relevant else "n")
        setattr(s, kind, getattr(s, kind) + 1)
        s.per_rule[verdict.rule][kind] += 1
        s.window_right += verdict.in_window == case.in_window
        s.rule_right += verdict.rule == case.rule
        if (
            verdict.relevant != case.relevant
            or verdict.rule != case.rule
            or verdict.in_window != case.in_window
        ):
            s.misses.append((case, verdict))
    return s
