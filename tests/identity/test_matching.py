"""Comparison and normalisation rules, without a database."""

from __future__ import annotations

from datetime import date

from broker.identity import matching
from broker.identity.matching import Demographics
from broker.identity.service import auto_link_allowed

P = matching.DEFAULT_PARAMS


def test_person_name_parsing_and_garbage() -> None:
    assert matching.parse_person_name("Müller^José^Maria^Dr") == ("MULLER", "JOSE", "MARIA")
    assert matching.parse_person_name("SMITH, JOHN") == ("SMITH", "JOHN", "")
    assert matching.parse_person_name("DOE^JOHN PAUL") == ("", "JOHN", "PAUL")  # DOE is a placeholder
    assert matching.parse_person_name("ANONYMOUS") == ("", "", "")
    assert matching.parse_person_name("12345^67890") == ("", "", "")
    assert matching.parse_person_name("^^^^") == ("", "", "")
    assert matching.parse_person_name("???") == ("", "", "")
    assert matching.parse_person_name("YAMADA^TARO=山田^太郎") == ("YAMADA", "TARO", "")


def test_impossible_dates_are_unknown() -> None:
    today = date(2026, 1, 1)
    assert matching.normalize_date("20230229", today=today) == ""  # not a leap year
    assert matching.normalize_date("19801332", today=today) == ""
    assert matching.normalize_date("20990101", today=today) == ""  # future
    assert matching.normalize_date("17000101", today=today) == ""
    assert matching.normalize_date("abc", today=today) == ""
    assert matching.normalize_date("1980-02-29", today=today) == "19800229"
    # From a DICOM header a typo'd month is kept for comparison, a garbage year is not.
    assert matching.normalize_date("19310175", today=today, lenient=True) == "19310175"
    assert matching.normalize_date("00000000", today=today, lenient=True) == ""


def test_typos_swaps_and_transpositions_still_agree() -> None:
    a = Demographics(
        family="NEUMANN", given="MICHAELA", birth_date="19151111", address="8 STANLEY STREET 4223"
    )
    typo = Demographics(
        family="NEUMAN", given="MICHEALA", birth_date="19151111", address="8 STANLEY STRET 4223"
    )
    swapped = Demographics(family="MICHAELA", given="NEUMANN", birth_date="19151111")
    day_month = Demographics(family="NEUMANN", given="MICHAELA", birth_date="19151111")
    other = Demographics(
        family="PAINTER", given="COURTNEY", birth_date="19161214", address="12 PINKERTON CIRCUIT 4560"
    )
    s_typo = matching.score_pair(a, typo, params=P)
    s_swap = matching.score_pair(a, swapped, params=P)
    s_other = matching.score_pair(a, other, params=P)
    assert s_typo.weight > 16 and auto_link_allowed(s_typo)
    assert s_swap.swapped and s_swap.contributions["names"]["level"] == "given and family swapped"
    assert s_swap.weight > 10
    assert s_other.weight < 0
    transposed = matching.score_pair(
        Demographics(family="NEUMANN", given="MICHAELA", birth_date="19150311"),
        Demographics(family="NEUMANN", given="MICHAELA", birth_date="19151103"),
        params=P,
    )
    assert transposed.contributions["birth_date"]["level"] == "one typo or day/month swapped"
    assert matching.score_pair(day_month, a, params=P).levels[3] == 0


def test_name_alone_never_auto_links() -> None:
    a = Demographics(family="ZYLBERSZTEJN", given="EUSTACHY")
    s = matching.score_pair(a, a, params=P, tf={"family": 1e-7, "given": 1e-7})
    assert s.weight > 30  # a very rare exact name weighs a lot...
    assert not auto_link_allowed(s)  # ...but it is still only a name
    assert not auto_link_allowed(s, strict=False)


def test_twins_and_father_son_are_not_auto_linked_in_strict_mode() -> None:
    base = dict(family="NGUYEN", birth_date="20150601", address="17 SHARWOOD CRESCENT 2866", sex="F")
    twin = matching.score_pair(
        Demographics(given="SONJA", **base), Demographics(given="PIA", **base), params=P
    )
    assert twin.weight > 16
    assert not auto_link_allowed(twin)
    junior = matching.score_pair(
        Demographics(family="HOWIE", given="ROY", birth_date="19500101", address="1 MAIN ROAD 2000"),
        Demographics(family="HOWIE", given="ROY", birth_date="19790923", address="1 MAIN ROAD 2000"),
        params=P,
    )
    assert not auto_link_allowed(junior)


def test_blocking_keys_survive_one_error() -> None:
    a = Demographics(
        family="NEUMANN", given="MICHAELA", birth_date="19151111", address="8 STANLEY STREET 4223"
    )
    for variant in (
        Demographics(family="NEWMAN", given="MICHAELA", birth_date="19151111"),  # family typo
        Demographics(family="NEUMANN", given="MICHAELA", birth_date="19151121"),  # date typo
        Demographics(family="NEUMANN", given="MICHAELA", birth_date=""),  # date missing
        Demographics(family="MICHAELA", given="NEUMANN", birth_date="19151111"),  # swapped
        Demographics(family="SMITH", given="MICHAELA", birth_date="", address="8 STANLEY ST 4223"),  # married
    ):
        assert matching.block_keys(a) & matching.query_keys(variant), variant


def test_em_recovers_m_from_unlabelled_pairs() -> None:
    import random

    rng = random.Random(3)
    names = [f"N{i:04d}" for i in range(2000)]
    pairs = []
    for _ in range(600):  # true matches with a few typos
        n, g = rng.choice(names), rng.choice(names)
        dob = f"19{rng.randint(20, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}"
        b_dob = dob if rng.random() < 0.9 else dob[:-1] + "0"
        pairs.append(
            (
                Demographics(family=n, given=g, birth_date=dob),
                Demographics(family=n, given=g, birth_date=b_dob),
            )
        )
    for _ in range(1400):  # non-matches that share a block (same birth year)
        pairs.append(
            (
                Demographics(family=rng.choice(names), given=rng.choice(names), birth_date="19500101"),
                Demographics(family=rng.choice(names), given=rng.choice(names), birth_date="19500102"),
            )
        )
    randoms = [(rng.choice(pairs)[0], rng.choice(pairs)[1]) for _ in range(5000)]
    u = matching.estimate_u(matching.level_matrix(randoms))
    params = matching.estimate_parameters(matching.level_matrix(pairs), u=u)
    assert 0.25 < params["lambda"] < 0.35
    assert params["m"]["birth_date"][0] > 0.8
    assert params["m"]["family"][0] > 0.9
