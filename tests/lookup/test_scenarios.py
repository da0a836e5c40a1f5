"""The labeled scenario set: precision and recall of `relevant` at least 0.95 both ways, the
look-back window exactly as labeled, and a set broad enough to mean something."""

from __future__ import annotations

import re
from typing import Any

import pytest

from broker.lookup import vocabulary
from tests.lookup.scenarios import SCENARIOS, Case, Score, load_cases, planned_exam, run, score

Labeled = tuple[dict[str, Any], list[Case], Score]


@pytest.fixture(scope="module")
def labeled() -> Labeled:
    doc, cases = load_cases()
    return doc, cases, score(cases)


def test_relevant_has_precision_and_recall_of_at_least_095(labeled: Labeled) -> None:
    _, _, s = labeled
    wrong = [
        (c.scenario, c.prior.study_description, c.relevant, v.rule)
        for c, v in s.misses
        if v.relevant != c.relevant
    ]
    assert s.precision >= 0.95, wrong
    assert s.recall >= 0.95, wrong


def test_no_labeled_relevance_regresses(labeled: Labeled) -> None:
    """Stricter than the target: every label of the set holds today, so any change to the data
    files that flips one shows here (relabel only with a clinical reason in the scenario's why)."""
    _, _, s = labeled
    assert [(c.scenario, c.prior.study_description) for c, v in s.misses if v.relevant != c.relevant] == []


def test_in_window_is_exactly_as_labeled(labeled: Labeled) -> None:
    _, _, s = labeled
    assert s.window_right == s.total, [
        (c.scenario, c.prior.study_date) for c, v in s.misses if v.in_window != c.in_window
    ]


def test_the_deciding_rule_is_the_labeled_one_in_nine_cases_of_ten(labeled: Labeled) -> None:
    _, _, s = labeled
    assert s.rule_right / s.total >= 0.9, [
        (c.scenario, c.rule, v.rule) for c, v in s.misses if v.rule != c.rule
    ]


def test_the_set_is_broad(labeled: Labeled) -> None:
    doc, cases, _ = labeled
    assert len(doc["scenario"]) >= 150
    whos = {c.who for c in cases}
    assert whos == {"child", "adult"}
    assert sum(c.who == "child" for c in cases) >= 50
    assert {c.setting for c in cases} == {"trauma", "ed", "inpatient", "outpatient"}
    rules = {c.rule for c in cases}
    assert {
        "region_overlap",
        "implied_coverage",
        "laterality_mismatch",
        "own_purpose",
        "guidance_prior",
        "dxa_only_with_dxa",
        "edge_only",
        "neighbour",
        "sibling",
        "coverage_direction",
    } <= rules
    assert sum(c.relevant for c in cases) >= 100 and sum(not c.relevant for c in cases) >= 100


def test_every_region_of_the_tree_is_exercised(labeled: Labeled) -> None:
    """Each region appears in some scenario, as a planned target or as what a prior covers."""
    _, cases, _ = labeled
    seen: set[str] = set()
    for case in cases:
        seen.update(planned_exam(case).regions)
        seen.update(run(case).prior.regions)
    assert set(vocabulary.load().regions) - seen == set()


@pytest.mark.parametrize(
    "abbreviation",
    [
        "CTAP",
        "A/P",
        "ABD/PEL",
        "CAP",
        "TAP",
        "NCAP",
        "CXR",
        "PA/LAT",
        "KUB",
        "CT KUB",
        "NCHCT",
        "CTH",
        "CTA H/N",
        "CTPA",
        "VQ",
        "HIDA",
        "MRCP",
        "VCUG",
        "UGI",
        "TVUS",
        "TTE",
        "MPI",
        "CCTA",
        "WBBS",
        "PANO",
        "DEXA",
        "DXA",
        "LENI",
    ],
)
def test_every_abbreviation_of_the_issue_is_in_a_scenario(labeled: Labeled, abbreviation: str) -> None:
    _, cases, _ = labeled
    texts = [c.planned["text"] or "" for c in cases] + [c.prior.study_description or "" for c in cases]
    pattern = re.compile(rf"(?<![A-Z]){re.escape(abbreviation)}(?![A-Z])")
    assert any(pattern.search(t) for t in texts)


def test_holdout_set_meets_the_target_too() -> None:
    """The holdout set was labeled after the engine was frozen (docs/lookup.md gives its first
    score); it must stay at the target, not necessarily at every label."""
    doc, cases = load_cases(SCENARIOS.with_name("holdout.toml"))
    s = score(cases)
    assert len(doc["scenario"]) >= 30
    assert s.precision >= 0.95 and s.recall >= 0.95, [(c.scenario, v.rule) for c, v in s.misses]
