"""The relevance engine: what a planned exam really is, and for every prior whether it is relevant
to it (the list), whether it lies in the setting's look-back window (the order-time warning), why,
and whether it can serve (thin slices, contrast phase, complete series).

Pure logic over the data files of `broker.lookup.vocabulary`: no database, no HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date

from broker.errors import BadRequest
from broker.lookup.schemas import (
    ExamInterpretation,
    Overlap,
    PriorFacts,
    ProcedureCode,
    Setting,
    Usability,
    Verdict,
    Windows,
)
from broker.lookup.vocabulary import CodeEntry, TextReading, Vocabulary, load

MAX_TEXT = 512
_MM = re.compile(r"(\d+(?:\.\d+)?)\s*MM\b")

RULE_OVERLAP = "region_overlap"
RULE_IMPLIED = "implied_coverage"
RULE_UNKNOWN = "prior_region_unknown"
RULE_LATERALITY = "laterality_mismatch"
RULE_OWN_PURPOSE = "own_purpose"
RULE_DIRECTION = "coverage_direction"
RULE_EDGE = "edge_only"
RULE_NEIGHBOUR = "neighbour"
RULE_SIBLING = "sibling"
RULE_NONE = "no_overlap"


# -- interpreting an exam ----------------------------------------------------------------------


def interpret_exam(
    *,
    text: str | None = None,
    code: str | None = None,
    code_system: str | None = None,
    modality: str | None = None,
    body_part: str | None = None,
    laterality: str | None = None,
) -> ExamInterpretation:
    """The planned exam: free text ("CT ABD/PEL W CONTRAST"), a CPT / LOINC / RadLex Playbook code,
    or modality + body part, in any combination.

    Raises BadRequest when nothing usable names a body region (empty or garbage text, an unknown
    code with no description to fall back to)."""
    vocab = load()
    if text is not None and len(text) > MAX_TEXT:
        raise BadRequest(f"Exam text longer than {MAX_TEXT} characters")
    text = (text or "").strip() or None
    code = (code or "").strip() or None
    if text is None and code is None and not body_part:
        raise BadRequest("Planned exam is empty: give its description, a procedure code or a body part")

    notes: list[str] = []
    entry: CodeEntry | None = None
    if code is not None:
        system, entry = vocab.code(code, code_system)
        if entry is None:
            known = f"{system.upper()} code" if system else "procedure code"
            if text is None and not body_part:
                raise BadRequest(
                    f"Unknown {known} {code!r} (codes.toml v{vocab.versions['codes']}) and no "
                    "description to fall back to"
                )
            notes.append(
                f"{known} {code} is not in codes.toml v{vocab.versions['codes']}: "
                "the exam was read from its description instead"
            )
    reading = vocab.read(text)
    if text is not None and entry is None and not reading.recognised and not body_part:
        raise BadRequest("Exam text names no modality or body region that the vocabulary knows")

    exam = _combine(
        vocab,
        entry=entry,
        reading=reading,
        dicom_modality=_family(vocab, modality),
        body_part=body_part,
        dicom_laterality=_side(laterality),
        text_label="description",
        notes=notes,
    )
    if not exam.regions:
        raise BadRequest("Planned exam names no body region: add the region or the body part")
    return exam


def interpret_prior(prior: PriorFacts) -> ExamInterpretation:
    """A prior study read as its description says: the procedure code when known, then the
    StudyDescription, then code meanings and series descriptions, and BodyPartExamined only when
    none of these names a region. Never raises: a prior that cannot be read has no regions."""
    vocab = load()
    notes: list[str] = []
    entry = _known_code(vocab, prior.procedure_codes)
    if entry is None and prior.procedure_codes:
        shown = ", ".join(c.value[:16] for c in prior.procedure_codes[:3])
        notes.append(f"procedure code {shown} not in codes.toml: read from the description")
    reading = vocab.read(_clip(prior.study_description))
    label = "StudyDescription"
    if not reading.regions_for(None) and not reading.regions_for("CT") and not reading.fallbacks_for("CT"):
        for alt_label, texts in (
            ("procedure code meaning", [c.meaning for c in prior.procedure_codes]),
            ("SeriesDescription", [s.description for s in prior.series]),
        ):
            alt = _read_many(vocab, texts)
            if alt.regions_for("CT") or alt.fallbacks_for("CT"):
                _merge_context(alt, reading)
                reading, label = alt, alt_label
                break
    dicom_modality = _prior_modality(vocab, prior)
    sides = {s for s in (_side(prior.laterality), *(_side(s.laterality) for s in prior.series)) if s}
    dicom_side = None if not sides else ("B" if "B" in sides or {"L", "R"} <= sides else sides.pop())
    body_part = prior.body_part_examined or next(
        (s.body_part_examined for s in prior.series if s.body_part_examined), None
    )
    exam = _combine(
        vocab,
        entry=entry,
        reading=reading,
        dicom_modality=dicom_modality,
        body_part=body_part,
        dicom_laterality=dicom_side,
        text_label=label,
        notes=notes,
        dicom_modality_wins=True,
    )
    if exam.contrast is None and any(s.contrast_agent for s in prior.series):
        exam = replace(exam, contrast="with")
    return exam


def _combine(
    vocab: Vocabulary,
    *,
    entry: CodeEntry | None,
    reading: TextReading,
    dicom_modality: str | None,
    body_part: str | None,
    dicom_laterality: str | None,
    text_label: str,
    notes: list[str],
    dicom_modality_wins: bool = False,
) -> ExamInterpretation:
    purposes = set(reading.purposes)
    if entry is not None:
        if entry.purpose:
            purposes.add(entry.purpose)
        if entry.guidance:
            purposes.add("guidance")

    # Modality: structured facts over words, strong words over weak ones.
    if dicom_modality_wins and dicom_modality:
        modality: str | None = dicom_modality
    else:
        modality = (entry.modality if entry else None) or reading.modality or dicom_modality
    modality = modality or reading.weak_modality
    if "dxa" in purposes:
        modality = "DXA"

    text_regions = vocab.expand(reading.regions_for(modality))
    if not text_regions:
        text_regions = vocab.expand(reading.fallbacks_for(modality))
    text_regions, collapsed = vocab.collapse_parts(text_regions, modality)
    if collapsed:
        notes.append(f"{', '.join(collapsed)} named with a part of it: the part is the target")
    text_regions, purpose_note = _own_purpose_filter(vocab, text_regions, purposes)
    if purpose_note:
        notes.append(purpose_note)

    bp_regions = vocab.body_part(body_part)
    if entry is not None:
        code_regions = vocab.expand(entry.regions)
        refines = all(any(vocab.relation(t, c) for c in code_regions) for t in text_regions)
        if text_regions and (refines or not code_regions):
            # the description names parts of the code's regions, or the code names none (guidance)
            regions, decided = text_regions, "code+text"
        else:
            regions, decided = code_regions, "code"
            if text_regions:
                notes.append(
                    f"the {text_label} names {', '.join(text_regions)} but {entry.system.upper()} "
                    f"{entry.code} ({entry.label}) names {', '.join(code_regions)}: the code was used"
                )
    elif text_regions:
        regions, decided = text_regions, _label(text_label)
    elif bp_regions:
        regions, decided = bp_regions, "body_part"
        notes.append(f"no region in the text: BodyPartExamined {body_part} was used")
    else:
        regions, decided = [], "none"

    disagrees = not any(vocab.relation(r, b) for r in regions for b in bp_regions)
    if bp_regions and decided not in ("body_part", "none") and disagrees:
        notes.append(
            f"BodyPartExamined {body_part} disagrees with the {text_label} and was not used "
            "(it is wrong in about 15% of studies)"
        )

    # Laterality: the text, the code, the DICOM attribute; sides that contradict are unknown.
    sides = {s for s in (reading.laterality, entry.laterality if entry else None, dicom_laterality) if s}
    if not sides:
        laterality = None
    elif len(sides) == 1:
        laterality = sides.pop()
    elif sides == {"L", "R"} or sides == {"L", "R", "B"}:
        laterality = None
        notes.append("left and right both stated: laterality treated as unknown")
    else:
        laterality = "B"  # bilateral beside one side: a bilateral study with a sided series
    if not any(vocab.is_paired(r) for r in regions):
        laterality = None

    contrast = reading.contrast or (entry.contrast if entry else None) or reading.weak_contrast
    terms = list(reading.terms)
    if entry is not None:
        terms.insert(0, f"{entry.system.upper()} {entry.code} = {entry.label} [{entry.source}]")
    return ExamInterpretation(
        modality=modality,
        regions=tuple(regions),
        laterality=laterality,
        contrast=contrast,
        decided_by=decided,
        purposes=frozenset(purposes),
        terms=tuple(terms),
        notes=tuple(notes),
    )


def _own_purpose_filter(
    vocab: Vocabulary, regions: list[str], purposes: set[str]
) -> tuple[list[str], str | None]:
    """The heart is targeted only by cardiac exams, the breast only by breast imaging."""
    defining = {p for p in purposes if p in {vocab.regions[r].own_purpose for r in vocab.regions}}
    if defining:
        kept = [r for r in regions if vocab.own_purpose(r) in defining]
        dropped = [r for r in regions if r not in kept]
        note = (
            f"{', '.join(sorted(defining))} exam: {', '.join(dropped)} in the text not targeted"
            if dropped
            else None
        )
        return kept, note
    own = [r for r in regions if vocab.own_purpose(r)]
    others = [r for r in regions if not vocab.own_purpose(r)]
    if own and others:
        return others, (
            f"{', '.join(own)} named in a non-{'/'.join(sorted({vocab.own_purpose(r) or '' for r in own}))} "
            "exam is not targeted (own-purpose region)"
        )
    return regions, None


def _label(text_label: str) -> str:
    return {
        "StudyDescription": "text",
        "procedure code meaning": "procedure_code_meaning",
        "SeriesDescription": "series_description",
    }.get(text_label, "text")


def _read_many(vocab: Vocabulary, texts: Iterable[str | None]) -> TextReading:
    merged = TextReading()
    for text in texts:
        if not text:
            continue
        part = vocab.read(_clip(text))
        merged.regions.extend(part.regions)
        merged.fallback_regions.extend(part.fallback_regions)
        merged.ct_fallback_regions.extend(part.ct_fallback_regions)
        merged.ct_only_regions.extend(part.ct_only_regions)
        merged.non_ct_regions.extend(part.non_ct_regions)
        merged.modality = merged.modality or part.modality
        merged.weak_modality = merged.weak_modality or part.weak_modality
        merged.lateralities |= part.lateralities
        merged.contrast = merged.contrast or part.contrast
        merged.weak_contrast = merged.weak_contrast or part.weak_contrast
        merged.purposes |= part.purposes
        merged.refines.update(part.refines)
        merged.terms.extend(part.terms)
    return merged


def _merge_context(target: TextReading, source: TextReading) -> None:
    """Keep what the description said besides regions (modality, contrast, purpose, side)."""
    target.modality = source.modality or target.modality
    target.weak_modality = source.weak_modality or target.weak_modality
    target.lateralities |= source.lateralities
    target.contrast = source.contrast or target.contrast
    target.purposes |= source.purposes
    target.refines.update(source.refines)
    target.terms[:0] = source.terms


def _known_code(vocab: Vocabulary, codes: Iterable[ProcedureCode]) -> CodeEntry | None:
    for c in codes:
        _, entry = vocab.code(c.value, c.scheme)
        if entry is not None:
            return entry
    return None


def _prior_modality(vocab: Vocabulary, prior: PriorFacts) -> str | None:
    families = {
        f
        for m in (*prior.modalities, *(s.modality for s in prior.series if s.modality))
        if (f := vocab.modality_family(m))
    }
    return next((m for m in vocab.modality_order if m in families), None)


def _family(vocab: Vocabulary, modality: str | None) -> str | None:
    if not modality:
        return None
    m = modality.strip().upper()
    if m in vocab.modality_order:
        return m
    family = vocab.modality_family(m)
    if family is None:
        reading = vocab.read(m)
        family = reading.modality or reading.weak_modality
    if family is None:
        raise BadRequest(f"Unknown modality {modality!r}")
    return family


def _side(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().upper()
    return {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R", "B": "B", "BOTH": "B", "BILATERAL": "B"}.get(v)


def _clip(text: str | None) -> str | None:
    return text[:MAX_TEXT] if text else text


def _described_thickness(description: str | None) -> float | None:
    """Slice thickness written in a SeriesDescription ("AXIAL 0.625MM", "BONE 1 MM")."""
    match = _MM.search((description or "").upper())
    return float(match.group(1)) if match else None


# -- judging a prior ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Covered:
    region: str
    laterality: str | None
    implied_from: str | None


def _coverage(prior: ExamInterpretation) -> list[_Covered]:
    """Regions a prior covers: those it names, plus what a cross-sectional trunk exam also shows
    (its spine, a pelvis's hips). Only priors get implied coverage: coverage is directional."""
    vocab = load()
    side = prior.laterality
    out = [_Covered(r, side if vocab.is_paired(r) else None, None) for r in prior.regions]
    for rule in vocab.implied:
        if prior.modality not in rule.modalities:
            continue
        for r in prior.regions:
            if vocab.relation(rule.region, r) in ("equal", "prior_contains"):
                # the prior names the trunk region (or a region containing it)
                out.extend(_Covered(a, rule.laterality, r) for a in vocab.expand(rule.adds))
    return out


def judge(
    planned: ExamInterpretation,
    prior: PriorFacts,
    *,
    setting: Setting | str,
    now: date,
    windows: Windows | None = None,
) -> Verdict:
    """Is this prior relevant to the planned exam, is it inside the setting's window, and why."""
    vocab = load()
    setting = Setting.parse(setting)
    windows = windows or vocab.default_windows()
    exam = interpret_prior(prior)
    usability = _usability(vocab, planned, prior, exam)

    window = windows.days(setting)
    age = None if prior.study_date is None else (now - prior.study_date).days
    in_window = age is not None and age <= window
    if age is None:
        time_reason = "study date unknown: not counted as inside the look-back window"
    else:
        shown_age = max(age, 0)
        where = "inside" if in_window else "outside"
        time_reason = f"{shown_age} days old: {where} the {setting.value} window of {window} days"

    described = _describe(exam, "prior")
    rule, relevant, overlaps, why = _decide(vocab, planned, exam)
    reasons = (described, *why, time_reason)
    return Verdict(
        relevant=relevant,
        in_window=in_window,
        rule=rule,
        reasons=reasons,
        prior=exam,
        usability=usability,
        overlaps=tuple(overlaps),
        age_days=age,
        window_days=window,
        versions=dict(vocab.versions),
    )


def judge_all(
    planned: ExamInterpretation,
    priors: Iterable[PriorFacts],
    *,
    setting: Setting | str,
    now: date,
    windows: Windows | None = None,
) -> list[Verdict]:
    return [judge(planned, p, setting=setting, now=now, windows=windows) for p in priors]


def _decide(
    vocab: Vocabulary, planned: ExamInterpretation, prior: ExamInterpretation
) -> tuple[str, bool, list[Overlap], list[str]]:
    if prior.is_guidance:
        return vocab.rule_ids["guidance"], False, [], ["procedure-guidance images are not a diagnostic prior"]
    if planned.is_dxa != prior.is_dxa:
        return (
            vocab.rule_ids["dxa"],
            False,
            [],
            ["bone densitometry (DXA) is compared only with bone densitometry"],
        )
    if not prior.regions:
        return RULE_UNKNOWN, False, [], ["the prior names no body region the vocabulary knows"]

    covered = _coverage(prior)
    overlaps: list[Overlap] = []
    lateral_misses: list[str] = []
    for p in planned.regions:
        p_side = planned.laterality if vocab.is_paired(p) else None
        for c in covered:
            relation = vocab.relation(p, c.region)
            if relation is None:
                continue
            if p_side in ("L", "R") and c.laterality in ("L", "R") and p_side != c.laterality:
                lateral_misses.append(f"{p} {p_side} (planned) vs {c.region} {c.laterality} (prior)")
                continue
            overlaps.append(
                Overlap(planned=p, prior=c.region, relation=relation, implied=c.implied_from is not None)
            )
    if overlaps:
        named = [o for o in overlaps if not o.implied]
        decisive = _dedupe_overlaps(named or overlaps)
        reasons = [_overlap_reason(o, covered) for o in decisive]
        return (RULE_OVERLAP if named else RULE_IMPLIED), True, decisive, reasons

    if lateral_misses:
        return RULE_LATERALITY, False, [], ["left does not match right: " + "; ".join(lateral_misses)]
    rule, reason = _near_miss(vocab, planned, prior)
    return rule, False, [], [reason]


def _dedupe_overlaps(overlaps: list[Overlap]) -> list[Overlap]:
    return list(dict.fromkeys(overlaps))


def _overlap_reason(o: Overlap, covered: list[_Covered]) -> str:
    if o.implied:
        source = next(c.implied_from for c in covered if c.region == o.prior and c.implied_from)
        return (
            f"{o.planned} (planned) is inside the prior's {source}: a cross-sectional exam of the "
            f"{source} also covers the {o.prior} (implied coverage)"
        )
    if o.relation == "equal":
        return f"{o.planned} (planned) = {o.prior} (prior)"
    if o.relation == "prior_contains":
        return f"{o.planned} (planned) lies within {o.prior} (prior)"
    return f"{o.prior} (prior) lies within {o.planned} (planned)"


def _near_miss(vocab: Vocabulary, planned: ExamInterpretation, prior: ExamInterpretation) -> tuple[str, str]:
    """Why regions that look close do not count, most telling rule first."""
    pairs = [(p, q) for p in planned.regions for q in prior.regions]
    for p, q in pairs:
        for own, other in ((p, q), (q, p)):
            purpose = vocab.own_purpose(own)
            if purpose and not vocab.own_purpose(other):
                lies_in = next(
                    (vocab.regions[r].lies_in for r in vocab.ancestors(own) if vocab.regions[r].lies_in),
                    None,
                )
                if lies_in and vocab.relation(other, lies_in):
                    return RULE_OWN_PURPOSE, (
                        f"{own} is targeted only by {purpose} exams: a {other} exam does not count for it"
                    )
    for p, q in pairs:
        for rule in vocab.implied:
            adds = vocab.expand(rule.adds)
            if _within(vocab, p, rule.region) and any(vocab.relation(a, q) for a in adds):
                return RULE_DIRECTION, (
                    f"coverage is directional: an exam of the {p} covers the {q} inside it, an exam of "
                    f"the {q} does not cover the {p}"
                )
            if _within(vocab, q, rule.region) and any(vocab.relation(p, a) for a in adds):
                return RULE_DIRECTION, (
                    f"an exam of the {q} covers the {p} inside it only when it is "
                    f"{'/'.join(sorted(rule.modalities))}, not {prior.modality or 'of unknown modality'}"
                )
    prior_regions = set(prior.regions)
    for edge in vocab.edges:
        if edge.region in vocab.macros:
            shown_by = set(vocab.macros[edge.region].regions) <= prior_regions
        else:
            shown_by = any(_within(vocab, q, edge.region) for q in prior.regions)
        if not shown_by:
            continue
        for p in planned.regions:
            if any(_within(vocab, p, s) for s in edge.shows):
                return RULE_EDGE, f"the prior shows {p} only at its edge ({edge.note}); edges do not count"
    for p, q in pairs:
        if (
            frozenset((vocab.top(p), vocab.top(q))) in vocab.neighbours
            or frozenset((p, q)) in vocab.neighbours
        ):
            return RULE_NEIGHBOUR, f"{p} and {q} are neighbours, not overlapping"
    for p, q in pairs:
        if vocab.regions[p].parent is not None and vocab.regions[p].parent == vocab.regions[q].parent:
            return RULE_SIBLING, f"{p} and {q} are different parts of {vocab.regions[p].parent}"
        if vocab.top(p) == vocab.top(q):
            return RULE_SIBLING, f"{p} and {q} are different parts of {vocab.top(p)}"
    return RULE_NONE, (
        f"no overlap between the planned {', '.join(planned.regions)} "
        f"and the prior's {', '.join(prior.regions)}"
    )


def _within(vocab: Vocabulary, region: str, container: str) -> bool:
    """region is container or lies inside it."""
    return vocab.relation(region, container) in ("equal", "prior_contains")


def _describe(exam: ExamInterpretation, who: str) -> str:
    side = f" {exam.laterality}" if exam.laterality else ""
    parts = f"{who}: {exam.modality or 'modality unknown'}; {', '.join(exam.regions) or 'no region'}{side}"
    parts += f" (from {exam.decided_by.replace('_', ' ')})"
    if exam.terms:
        parts += "; read: " + ", ".join(exam.terms)
    if exam.notes:
        parts += "; " + "; ".join(exam.notes)
    return parts


def describe_planned(planned: ExamInterpretation) -> str:
    return _describe(planned, "planned")


# -- usability ---------------------------------------------------------------------------------


def _usability(
    vocab: Vocabulary, planned: ExamInterpretation, prior: PriorFacts, exam: ExamInterpretation
) -> Usability:
    notes: list[str] = []
    thin: bool | None = None
    if exam.modality in ("CT", "PT", "MR"):
        cross = [s for s in prior.series if s.modality in (None, "CT", "MR")]
        thicknesses = [s.slice_thickness_mm for s in cross if s.slice_thickness_mm is not None]
        described = [_described_thickness(s.description) for s in cross]
        described_thin = any(d is not None and d <= vocab.thin_slice_max_mm for d in described) or any(
            any(w in vocab.tokens(s.description or "") for w in vocab.thin_words) for s in cross
        )
        if thicknesses:
            thin = min(thicknesses) <= vocab.thin_slice_max_mm or described_thin
            if not thin:
                notes.append(
                    f"thinnest reconstruction {min(thicknesses):g} mm: no thin slices "
                    f"(<= {vocab.thin_slice_max_mm:g} mm) for multiplanar review"
                )
        elif described_thin:
            thin = True

    phases: list[str] = []
    for s in prior.series:
        words = f" {' '.join(vocab.tokens(s.description or ''))} "
        for phase, keys in vocab.phase_words.items():
            if phase not in phases and any(f" {k} " in words for k in keys):
                phases.append(phase)

    contrast = exam.contrast
    if contrast is None and phases:
        contrast = (
            "with_and_without"
            if "non_contrast" in phases and len(phases) > 1
            else ("without" if phases == ["non_contrast"] else "with")
        )
    matches: bool | None = None
    if planned.contrast and contrast:
        want = {"with_and_without": {"with", "without"}}.get(planned.contrast, {planned.contrast})
        have = {"with_and_without": {"with", "without"}}.get(contrast, {contrast})
        matches = want <= have

    counted = [
        s for s in prior.series if s.expected_instances is not None and s.number_of_instances is not None
    ]
    complete: bool | None = None
    if counted:
        short = [s for s in counted if (s.number_of_instances or 0) < (s.expected_instances or 0)]
        complete = not short
        if short:
            notes.append(f"{len(short)} series incomplete")
    return Usability(
        thin_slices=thin,
        contrast=contrast,
        phases=tuple(phases),
        contrast_matches_planned=matches,
        series_complete=complete,
        notes=tuple(notes),
    )
