"""The link policy on the error patterns FEBRL and real registries produce: what links, what waits
for a human, under the strict policy (default) and Fellegi–Sunter only."""

from __future__ import annotations

import random

import numpy as np
from sqlmodel import Session

from broker.identity import matching, service
from broker.identity.matching import Demographics
from broker.identity.service import AUTO_WEIGHT, auto_link_allowed
from tests.identity.conftest import ingest_patient

P = matching.DEFAULT_PARAMS
HOME = "17 SHARWOOD CRESCENT GOWRIE NARELLAN VIC 2866"


def _linkable(a: Demographics, b: Demographics, *, strict: bool) -> bool:
    s = matching.score_pair(a, b, params=P)
    return s.weight >= AUTO_WEIGHT and auto_link_allowed(s, strict=strict)


def test_swapped_names_and_split_given_name_link_under_strict() -> None:
    a = Demographics(family="NEUMANN", given="MICHAELA", birth_date="19151111", address=HOME)
    swapped = Demographics(family="MICHAELA", given="NEUMANN", birth_date="19151111", address=HOME)
    assert _linkable(a, swapped, strict=True)
    # A space typed into the given name makes it given + middle in a DICOM PN.
    jayde = Demographics(family="CROUCH", given="JAYDE", birth_date="19250406", address=HOME)
    split = Demographics(family="CROUCH", given="JA", middle="YDE", birth_date="19250406", address=HOME)
    assert matching.compare_levels(jayde, split)[0][1] == 1
    assert _linkable(jayde, split, strict=True)


def test_short_name_typos_are_not_twins_but_rhyming_names_are() -> None:
    base = dict(family="HOWIE", birth_date="20150601", address=HOME)
    assert _linkable(Demographics(given="ROY", **base), Demographics(given="RIY", **base), strict=True)
    assert _linkable(Demographics(given="TEAL", **base), Demographics(given="TEA", **base), strict=True)
    for x, y in (("MIA", "PIA"), ("AVA", "EVA"), ("SONJA", "PIA")):
        twin = matching.score_pair(Demographics(given=x, **base), Demographics(given=y, **base), params=P)
        assert twin.weight >= AUTO_WEIGHT, (x, y)  # the weights alone would link them...
        assert not auto_link_allowed(twin, strict=True), (x, y)  # ...strict sends them to review
        assert auto_link_allowed(twin, strict=False)


def test_father_son_rule_needs_a_generation_between_the_dates() -> None:
    senior = Demographics(family="HOWIE", given="ROY", birth_date="19500101", address=HOME)
    junior = Demographics(family="HOWIE", given="ROY", birth_date="19790923", address=HOME)
    s = matching.score_pair(senior, junior, params=P)
    assert s.years_apart == 29 and not auto_link_allowed(s, strict=True)
    # Plainly different dates two years apart are a wrong date, not a son: the weight decides.
    wrong = Demographics(family="HOWIE", given="ROY", birth_date="19520817", address=HOME)
    assert auto_link_allowed(matching.score_pair(senior, wrong, params=P), strict=True)


def test_without_names_fs_only_needs_two_other_fields_and_strict_never_links() -> None:
    a = Demographics(family="VINCENT", given="JESSE", birth_date="19031203", address=HOME)
    renamed = Demographics(family="SMOLCKI", given="EMMA", birth_date="19031203", address=HOME)
    s = matching.score_pair(a, renamed, params=P)
    assert not auto_link_allowed(s, strict=True)
    assert auto_link_allowed(s, strict=False)
    only_date = matching.score_pair(
        a, Demographics(family="SMOLCKI", given="EMMA", birth_date="19031203"), params=P
    )
    assert not auto_link_allowed(only_date, strict=False)


def test_blocking_finds_records_with_both_names_or_the_date_wrong() -> None:
    a = Demographics(family="GILLARD", given="JAKE", birth_date="19590828", address=HOME)
    for variant in (
        # typo in the day and in both names (no phonetic key agrees)
        Demographics(family="GILLATD", given="JAKD", birth_date="19590808"),
        # both names replaced, no birth date, postcode mistyped: street and town still agree
        Demographics(family="PATIENCE", given="GABRIELLE", address="17 SHARWOOD CRESCENT NARELLAN VIC 2686"),
        # given name replaced, birth year mistyped
        Demographics(family="GILLARD", given="HAMISH", birth_date="19570828", address=HOME),
    ):
        assert matching.block_keys(a) & matching.query_keys(variant), variant


def test_em_per_training_rule_does_not_learn_from_the_blocked_field() -> None:
    rng = random.Random(5)
    names = [f"N{i:04d}" for i in range(3000)]
    pairs = []
    for _ in range(500):  # true matches, 10 % with a replaced family name
        f, g = rng.choice(names), rng.choice(names)
        pairs.append(
            (
                Demographics(family=f, given=g, birth_date="19600101"),
                Demographics(
                    family=f if rng.random() < 0.9 else rng.choice(names), given=g, birth_date="19600101"
                ),
            )
        )
    for _ in range(500):  # non-matches that share the birth date they were blocked on
        pairs.append(
            (
                Demographics(family=rng.choice(names), given=rng.choice(names), birth_date="19600101"),
                Demographics(family=rng.choice(names), given=rng.choice(names), birth_date="19600101"),
            )
        )
    randoms = [(rng.choice(pairs)[0], rng.choice(pairs)[1]) for _ in range(5000)]
    u = matching.estimate_u(matching.level_matrix(randoms))
    params = matching.estimate_parameters_by_rule({"d": matching.level_matrix(pairs)}, u=u)
    assert abs(params["m"]["family"][0] - 0.9) < 0.05
    # Every pair agrees on the birth date by construction: its m stays the prior, not ~1.
    assert np.allclose(params["m"]["birth_date"], P["m"]["birth_date"])
    assert np.allclose(params["m"]["phone"], P["m"]["phone"])  # no data: the prior, not uniform


def test_a_swapped_name_links_and_a_twin_waits_for_review(session: Session) -> None:
    first = ingest_patient(session, "fac-a", "A1", "NGUYEN^SONJA", "20150601", "F", address=HOME)
    swapped = ingest_patient(session, "fac-b", "B2", "SONJA^NGUYEN", "20150601", "F", address=HOME)
    assert swapped.person_id == first.person_id
    twin = ingest_patient(session, "fac-b", "B1", "NGUYEN^PIA", "20150601", "F", address=HOME)
    assert twin.person_id != first.person_id
    twin_record = service.get_record(session=session, issuer="ISSUER-B", value="B1")
    assert twin_record is not None
    assert [i.record_id for i in service.review_queue(session=session)] == [twin_record.id]
    # With the twin known, SONJA's next study (names swapped again) still finds SONJA: the twin
    # weighs as much, but the rules call that pair two people, so it is no rival.
    again = ingest_patient(session, "fac-c", "C1", "SONJA^NGUYEN", "20150601", "F", address=HOME)
    assert again.person_id == first.person_id
    assert len(service.review_queue(session=session)) == 1


def test_a_crossed_reading_that_agrees_on_the_family_name_only_is_a_twin() -> None:
    s = matching.score_pair(
        Demographics(family="SONJA", given="NGUYEN", birth_date="20150601", address=HOME),
        Demographics(family="NGUYEN", given="PIA", birth_date="20150601", address=HOME),
        params=P,
    )
    assert s.swapped and s.weight >= AUTO_WEIGHT
    assert not auto_link_allowed(s, strict=True)


def test_u_discounts_the_true_matches_among_random_pairs() -> None:
    # 10 of 10,000 random pairs agree exactly on the family name; the model expects 9 of them
    # to be true matches (share 0.001, m exact 0.9), so chance agreement is ~1 in 10,000.
    levels = np.full((10_000, len(matching.FIELDS)), -1, dtype=np.int8)
    fam = matching.FIELDS.index("family")
    levels[:, fam] = 3
    levels[:10, fam] = 0
    m = {f: list(P["m"][f]) for f in matching.FIELDS}
    m["family"] = [0.9, 0.05, 0.03, 0.02]
    raw = matching.estimate_u(levels)["family"][0]
    corrected = matching.estimate_u(levels, match_share=0.001, m=m)["family"][0]
    assert raw > 0.0009
    assert 1e-4 <= corrected < raw / 5  # never below one observation in the sample
