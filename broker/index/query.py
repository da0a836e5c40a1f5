"""The one query engine: QIDO-RS, C-FIND, FHIR and the lookup all ask through `search`.

Matching follows PS3.4 C.2.2.2: single value, wildcards (`*`, `?`), ranges for dates and times,
UID lists, universal matching (an empty value returns the attribute without constraining).
PatientName and ReferringPhysicianName are matched case-insensitively in each of their
component groups (Alphabetic, Ideographic, Phonetic); PatientName with fuzzy matching also
accent- and width-insensitively, each query component matching the start of a name component.
Every match is on an indexed column of one row per level (ReferringPhysicianName only narrows
what other keys select), so cost depends on the page asked for, not on the size of the archive.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, exists, func, or_, select, union_all
from sqlalchemy.sql import Select
from sqlmodel import Session

from broker.db import core_table
from broker.dicom import attributes as A
from broker.dicom.bounds import bound_dataset, bound_text
from broker.dicom.json_model import casefold_pn, fuzzy_pn, pn_json, without_bulk
from broker.dicom.uids import is_valid_uid
from broker.errors import BadRequest
from broker.index.ingest import normalize_time
from broker.index.models import Instance, Patient, Series, Study
from broker.index.packing import unpack_metadata
from broker.index.schemas import Query, QueryResult, StudyOwner

_study = core_table(Study)
_series = core_table(Series)
_inst = core_table(Instance)
_patient = core_table(Patient)

_ESC = "!"


@dataclass(frozen=True)
class _Key:
    kind: str  # UI, DA, TM, PN, STR, ISSUER, CSLIST, INT, MODS
    column: Any
    fuzzy_column: Any = None
    # PN kept per component group: (casefolded, fuzzy or None) columns of the Alphabetic,
    # Ideographic and Phonetic groups. Empty: the one column holds the Alphabetic group only.
    groups: tuple[tuple[Any, Any], ...] = ()
    # The same columns of an alias of the table per group, for `_any_group`'s subqueries: made
    # once here (an alias built per query cost ~1.5 ms of column proxies). Empty when the groups
    # have no index to probe (one OR over the rows scanned anyway).
    group_aliases: tuple[tuple[Any, Any, Any], ...] = ()


_GROUP_COLUMNS = (
    ("name_norm", "name_fuzzy"),
    ("name_ideographic", "name_ideographic_fuzzy"),
    ("name_phonetic", "name_phonetic_fuzzy"),
)


def _name_key(table: Any) -> _Key:
    aliases = [table.alias(f"{table.name}_pn{i}") for i in range(len(_GROUP_COLUMNS))]
    return _Key(
        "PN",
        table.c.name_norm,
        table.c.name_fuzzy,
        tuple((table.c[norm], table.c[fuzzy]) for norm, fuzzy in _GROUP_COLUMNS),
        tuple(
            (a.c.pk, a.c[norm], a.c[fuzzy]) for a, (norm, fuzzy) in zip(aliases, _GROUP_COLUMNS, strict=True)
        ),
    )


def _keys() -> dict[str, dict[str, _Key]]:
    study = {
        "PatientName": _name_key(_study),
        "PatientID": _Key("STR", _study.c.patient_id),
        "IssuerOfPatientID": _Key("ISSUER", _study.c.issuer),
        "PatientBirthDate": _Key("DA", _study.c.birth_date),
        "PatientSex": _Key("CSLIST", _study.c.sex),
        "StudyDate": _Key("DA", _study.c.study_date),
        "StudyTime": _Key("TM", _study.c.study_time),
        "AccessionNumber": _Key("STR", _study.c.accession_number),
        "StudyID": _Key("STR", _study.c.study_id),
        "StudyInstanceUID": _Key("UI", _study.c.study_uid),
        "StudyDescription": _Key("STR", _study.c.study_description),
        "ReferringPhysicianName": _Key(
            "PN",
            _study.c.referring_physician,
            groups=tuple(
                (_study.c[column], None)
                for column in (
                    "referring_physician",
                    "referring_physician_ideographic",
                    "referring_physician_phonetic",
                )
            ),
        ),
        "ModalitiesInStudy": _Key("MODS", _study.c.modalities),
    }
    series = {
        "Modality": _Key("CSLIST", _series.c.modality),
        "SeriesInstanceUID": _Key("UI", _series.c.series_uid),
        "SeriesNumber": _Key("INT", _series.c.series_number),
        "SeriesDescription": _Key("STR", _series.c.series_description),
        "BodyPartExamined": _Key("CSLIST", _series.c.body_part),
        "PerformedProcedureStepStartDate": _Key("DA", _series.c.pps_start_date),
        "PerformedProcedureStepStartTime": _Key("TM", _series.c.pps_start_time),
    }
    instance = {
        "SOPClassUID": _Key("UI", _inst.c.sop_class_uid),
        "SOPInstanceUID": _Key("UI", _inst.c.sop_uid),
        "InstanceNumber": _Key("INT", _inst.c.instance_number),
        "Rows": _Key("INT", _inst.c.rows),
        "Columns": _Key("INT", _inst.c.columns),
        "NumberOfFrames": _Key("INT", _inst.c.number_of_frames),
    }
    patient = {
        "PatientName": _name_key(_patient),
        "PatientID": _Key("STR", _patient.c.patient_id),
        "IssuerOfPatientID": _Key("ISSUER", _patient.c.issuer),
        "PatientBirthDate": _Key("DA", _patient.c.birth_date),
        "PatientSex": _Key("CSLIST", _patient.c.sex),
    }
    return {
        "patient": patient,
        "study": study,
        "series": {**study, **series},
        "instance": {**study, **series, **instance},
    }


KEYS = _keys()

# Attributes a level answers but does not match on (ignored for matching, returned when asked).
_RETURN_ONLY = {
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
    "InstanceAvailability",
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
    "QueryRetrieveLevel",
}

_INT_RE = re.compile(r"^[+-]?[0-9]{1,12}$")
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"
)


def _like(value: str) -> str:
    out = []
    for ch in value:
        if ch in "%_" + _ESC:
            out.append(_ESC + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _string_match(column: Any, value: str) -> ColumnElement[bool]:
    if _has_wildcard(value):
        return column.like(_like(value), escape=_ESC)
    return column == value


def _check_date(keyword: str, value: str) -> str:
    if not _DATE_RE.match(value):
        raise BadRequest(f"{keyword}: {value[:40]!r} is not a date (YYYYMMDD)")
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError as exc:
        raise BadRequest(f"{keyword}: {value!r} is not a valid date") from exc
    return value


def _check_clock(keyword: str, value: str, hh: str, mm: str | None, ss: str | None) -> None:
    # PS3.5 6.2: hours 00-23, minutes 00-59, seconds 00-60 (60 for a leap second).
    if int(hh) > 23:
        raise BadRequest(f"{keyword}: {value[:40]!r} has no hour {hh} (00-23)")
    if mm is not None and int(mm) > 59:
        raise BadRequest(f"{keyword}: {value[:40]!r} has no minute {mm} (00-59)")
    if ss is not None and int(ss) > 60:
        raise BadRequest(f"{keyword}: {value[:40]!r} has no second {ss} (00-60)")


def _check_time(keyword: str, value: str) -> str:
    # Colons are the ACR-NEMA form (HH:MM:SS) that PS3.4 C.2.2.2.5 still lets a query use.
    bare = value.replace(":", "")
    m = _TIME_RE.match(bare)
    if not m:
        raise BadRequest(f"{keyword}: {value[:40]!r} is not a time (HHMMSS.FFFFFF)")
    _check_clock(keyword, value, m.group(1), m.group(2), m.group(3))
    return bare


def _check_datetime(keyword: str, value: str) -> str:
    m = _DT_RE.match(value)
    if not m:
        raise BadRequest(f"{keyword}: {value[:40]!r} is not a date-time (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    year, month, day, hh, mm, ss, _frac, offset = m.groups()
    try:
        date(int(year), int(month or 1), int(day or 1))
    except ValueError as exc:
        raise BadRequest(f"{keyword}: {value[:40]!r} is not a valid date-time") from exc
    if hh is not None:
        _check_clock(keyword, value, hh, mm, ss)
    if offset is not None and (int(offset[1:3]) > 14 or int(offset[3:]) > 59):
        raise BadRequest(f"{keyword}: {value[:40]!r} has no UTC offset {offset}")
    return value


_CHECKS: dict[str, Callable[[str, str], str]] = {"DA": _check_date, "TM": _check_time, "DT": _check_datetime}


def _order_key(vr: str, value: str) -> str:
    """A bound as a string that sorts like the instant it names (for checking a range's order)."""
    if vr == "TM":
        return normalize_time(value)
    if vr == "DT":
        return re.split(r"[+-]", value)[0].ljust(21, "0")
    return value


def _split_range(keyword: str, vr: str, value: str) -> tuple[str, str] | None:
    """(low, high) of a range match value (either may be empty), None for a single value.

    A DT value may carry a UTC offset (-0500), so its range separator is the one '-' that leaves
    a valid date-time (or nothing) on each side."""
    if "-" not in value:
        return None
    check = _CHECKS[vr]
    if vr == "DT":
        try:
            check(keyword, value)
            return None
        except BadRequest:
            pass
        for i, ch in enumerate(value):
            if ch != "-":
                continue
            lo, hi = value[:i], value[i + 1 :]
            try:
                for side in (lo, hi):
                    if side:
                        check(keyword, side)
            except BadRequest:
                continue
            return lo, hi
        raise BadRequest(f"{keyword}: {value[:60]!r} is neither a date-time nor a range of two")
    lo, _, hi = value.partition("-")
    return lo.strip(), hi.strip()


def check_temporal(keyword: str, vr: str, value: str) -> tuple[str, str] | None:
    """Validate a DA/TM/DT match value (single or range, PS3.4 C.2.2.2.5); 400 when malformed.

    Returns the (low, high) bounds of a range, None for a single value."""
    check = _CHECKS[vr]
    bounds = _split_range(keyword, vr, value)
    if bounds is None:
        check(keyword, value)
        return None
    lo, hi = bounds
    if not lo and not hi:
        raise BadRequest(f"{keyword}: an empty range '-' is not a valid match value")
    lo = check(keyword, lo) if lo else ""
    hi = check(keyword, hi) if hi else ""
    if lo and hi and _order_key(vr, lo) > _order_key(vr, hi):
        raise BadRequest(f"{keyword}: the range {value[:60]!r} ends before it starts")
    return lo, hi


def _range(
    keyword: str, vr: str, column: Any, value: str, norm: Callable[[str, bool], str]
) -> ColumnElement[bool]:
    bounds = check_temporal(keyword, vr, value)
    if bounds is None:
        single = _CHECKS[vr](keyword, value)
        if vr == "TM":
            # Every stored spelling of the instants the value names, at its precision: 101500
            # finds 101500, 101500.000 and 101500.25 (the index keeps a time as written).
            return and_(column >= norm(single, False), column <= norm(single, True))
        return column == norm(single, False)
    lo, hi = bounds
    conds = []
    if lo:
        conds.append(column >= norm(lo, False))
    if hi:
        conds.append(column <= norm(hi, True))
    return and_(column != "", *conds)


def _date_norm(value: str, _upper: bool) -> str:
    return value


def _time_norm(value: str, upper: bool) -> str:
    """A time as a bound on the stored HHMMSS[.ffffff] strings, at the precision it was given:
    as an upper bound its last instant (1230 ends at 123059.999999, 101500.5 at 101500.599999),
    as a lower bound its first, with a fraction's trailing zeros dropped: the index keeps a
    fraction as the object wrote it, and of 101500, 101500.0 and 101500.000 (one instant) the
    shortest sorts first."""
    main, _dot, frac = value.replace(":", "").strip().partition(".")
    if upper:
        return main.ljust(6, "9")[:6] + "." + frac.ljust(6, "9")[:6]
    frac = frac.rstrip("0")
    return main.ljust(6, "0")[:6] + ("." + frac if frac else "")


def _values(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[\\,]", value) if v.strip()]


def _pn_group(column: Any, fuzzy_column: Any, value: str, fuzzy: bool) -> ColumnElement[bool]:
    """One PN component group's match: case-insensitive, with wildcards; fuzzy (when the key has
    a fuzzy column) also folded as json_model.fuzzy_pn folds, each query component matching the
    start of a name component."""
    if fuzzy and fuzzy_column is not None:
        v = fuzzy_pn(value)
        if "^" in v:
            # Each query component, in order, is the start of a name component: the first
            # the family name's, each next one a later component's (mul^ha: Müller^Hans).
            first, *rest = v.split("^")
            pattern = _like(first) + "%" + "".join("^" + _like(c) + "%" for c in rest)
            return fuzzy_column.like(pattern, escape=_ESC)
        if _has_wildcard(v):
            return fuzzy_column.like(_like(v), escape=_ESC)
        return or_(
            fuzzy_column.like(_like(v) + "%", escape=_ESC),
            fuzzy_column.like("%^" + _like(v) + "%", escape=_ESC),
            fuzzy_column.like("% " + _like(v) + "%", escape=_ESC),
        )
    return _string_match(column, casefold_pn(value) if not _has_wildcard(value) else value.casefold())


def _any_group(key: _Key, value: str, fuzzy: bool, dialect: str) -> ColumnElement[bool]:
    """The rows whose any PN component group matches `value`, written for the database at hand.

    PostgreSQL (and any other): an OR of the groups' conditions, one BitmapOr over their
    indexes. SQLite: `pk IN (one SELECT per group, UNION ALL)`, each SELECT one index prefix
    scan as the Alphabetic group's match always was: given the OR with bound LIKE patterns,
    SQLite scanned the whole table in key order (about 25 times slower on 50,000 studies),
    while PostgreSQL's plan of the UNION costs more than its BitmapOr. A value no index serves
    anyway (a leading wildcard; fuzzy matching of a word anywhere in the name) is one OR over
    one scan on both."""
    folded = fuzzy_pn(value) if fuzzy else value
    scan = _has_wildcard(folded[:1]) or (fuzzy and "^" not in folded and not _has_wildcard(folded))
    if dialect != "sqlite" or scan or not key.group_aliases:
        return or_(*(_pn_group(norm, fuzzy_column, value, fuzzy) for norm, fuzzy_column in key.groups))
    selects = [
        select(pk).where(_pn_group(norm, fuzzy_column, value, fuzzy))
        for pk, norm, fuzzy_column in key.group_aliases
    ]
    return key.column.table.c.pk.in_(union_all(*selects))


def _condition(
    keyword: str, key: _Key, value: str, fuzzy: bool, dialect: str = ""
) -> ColumnElement[bool] | None:
    if value == "" or value == "*":
        return None  # universal matching
    kind = key.kind
    if kind == "ISSUER":
        # The broker's qualified issuer (a facility's, up to 128 characters) or the object's own
        # IssuerOfPatientID, bounded as LO (see models.Study).
        own_value = value if _has_wildcard(value) else bound_text("LO", value)
        own = _string_match(_study.c.issuer_in_data, own_value)
        if key.column is _patient.c.issuer:
            own = exists().where(_study.c.patient_pk == _patient.c.pk, own)
        return or_(_string_match(key.column, value), own)
    if kind in ("STR", "PN") and not _has_wildcard(value):
        # The index holds values cut to their VR's maximum (dicom.bounds); a single value is cut
        # the same way, so an over-long value still finds the object it came from.
        value = bound_text(A.vr_of(A.tag_hex(keyword)), value)
    if kind == "UI":
        uids = _values(value)
        for uid in uids:
            if not is_valid_uid(uid):
                raise BadRequest(f"{keyword}: {uid[:80]!r} is not a valid UID")
        return key.column.in_(uids)
    if kind in ("DA", "TM"):
        norm = _date_norm if kind == "DA" else _time_norm
        try:
            return _range(keyword, kind, key.column, value, norm)
        except BadRequest as exc:
            form = "YYYYMMDD" if kind == "DA" else "HHMMSS"
            hint = f"{keyword} takes a value or a range such as {form}-{form}"
            raise BadRequest(f"{exc.message}; {hint} (got {value[:40]!r})") from exc
    if kind == "INT":
        # PS3.5 6.2 IS: an optional sign and digits, -2^31 to 2^31-1 (US values fit too). Python's
        # int() would also take `1_0` and any size, which no column can hold (a 500, not a 400).
        text = value.strip()
        if not _INT_RE.match(text) or not -(2**31) <= int(text) < 2**31:
            raise BadRequest(f"{keyword}: {value[:80]!r} is not an integer from -2147483648 to 2147483647")
        return key.column == int(text)
    if kind == "PN":
        if not key.groups:
            return _pn_group(key.column, key.fuzzy_column, value, fuzzy)
        if "=" in value:
            # Component groups given (Yamada^Tarou=山田^太郎, =山田*): each group given matches
            # that group of the name; an empty or `*` group leaves it unconstrained.
            parts = value.split("=")[:3]
            conds = [
                _pn_group(norm, fuzzy_column, part, fuzzy)
                for (norm, fuzzy_column), part in zip(key.groups, parts, strict=False)
                if part not in ("", "*")
            ]
            return and_(*conds) if conds else None
        # One group given: the name matches when any of its groups does (山田* finds
        # Yamada^Tarou=山田^太郎).
        return _any_group(key, value, fuzzy, dialect)
    if kind == "CSLIST":
        vals = _values(value)
        return or_(*(_string_match(key.column, v) for v in vals))
    if kind == "MODS":
        # The column is `\CT\MR\`. A wildcard that leads or trails (M*, *T) stays within one code;
        # one in the middle (C*T) may also span two codes (CR and OT): an over-match, never a miss.
        return or_(
            *(
                key.column.like("%\\" + _like(v) + "\\%", escape=_ESC)
                if _has_wildcard(v)
                else key.column.contains("\\" + v + "\\", autoescape=True)
                for v in _values(value)
            )
        )
    return _string_match(key.column, value)


def _filters(query: Query, dialect: str = "") -> tuple[list[ColumnElement[bool]], set[str], list[str]]:
    """The WHERE conditions of a query (`dialect`: the database's, for the forms only one of
    them plans well), the tags asked for, and the keys ignored for matching."""
    keys = KEYS[query.level]
    conds: list[ColumnElement[bool]] = []
    asked: set[str] = set()
    ignored: list[str] = []
    for raw_key, value in query.filters.items():
        tag = A.resolve_key(raw_key)
        if tag is None:
            raise BadRequest(f"unknown attribute {raw_key[:64]!r}: not a DICOM keyword or tag")
        keyword = A.keyword_of(tag)
        values = query.any_of.get(raw_key) or (value,)
        if any("\x00" in v for v in values):
            # No DICOM text value holds NUL (PS3.5 6.1.2), and PostgreSQL refuses it in a string
            # parameter: refused here, the same on every backend, whether the key is matched or not.
            raise BadRequest(f"{keyword}: a match value cannot contain a NUL character")
        asked.add(tag)
        key = keys.get(keyword)
        if key is None:
            constrained = [v for v in values if v not in ("", "*")]
            if constrained and keyword not in _RETURN_ONLY:
                vr = A.vr_of(tag)
                if vr in _CHECKS:
                    # Not matched on, but a malformed date or time is still a bad request.
                    for v in constrained:
                        check_temporal(keyword, vr, v)
                ignored.append(keyword)
            continue
        alternatives = [_condition(keyword, key, v, query.fuzzy, dialect) for v in values]
        present = [c for c in alternatives if c is not None]
        if len(present) == len(alternatives):
            # A universal value among them (None) leaves the key unconstrained.
            conds.append(or_(*present) if len(present) > 1 else present[0])
    if query.study_uid is not None:
        conds.append(_study.c.study_uid == query.study_uid)
    if query.series_uid is not None:
        conds.append(_series.c.series_uid == query.series_uid)
    if query.facility_id is not None:
        conds.append(
            _study.c.facility_id == query.facility_id
            if query.level != "patient"
            else _patient.c.facility_id == query.facility_id
        )
    if query.patient_pks is not None:
        owner = _patient.c.pk if query.level == "patient" else _study.c.patient_pk
        conds.append(owner.in_(list(query.patient_pks)))
    if query.visible is not None:
        if query.level == "patient":
            conds.append(query.visible(_patient.c.facility_id, _patient.c.pk))
        else:
            # Series and instance queries join their study: the study row decides.
            conds.append(query.visible(_study.c.facility_id, _study.c.patient_pk))
    if query.body_parts is not None:
        if query.level != "study":
            raise BadRequest("body_parts constrains study-level queries only")
        conds.append(
            exists().where(_series.c.study_pk == _study.c.pk, _series.c.body_part.in_(list(query.body_parts)))
        )
    if query.order != "pk" and query.level != "study":
        raise BadRequest("only study-level queries are ordered by date")
    return conds, asked, ignored


def _wanted(query: Query, defaults: frozenset[str], asked: set[str]) -> frozenset[str] | None:
    if query.includefields == "all":
        return None
    extra = set()
    for f in query.includefields:
        tag = A.resolve_key(f)
        if tag is None:
            raise BadRequest(f"includefield: unknown attribute {f[:64]!r}")
        extra.add(tag)
    return defaults | extra | asked


def _pick(attrs: dict[str, Any], wanted: frozenset[str] | None) -> dict[str, Any]:
    if wanted is None:
        return dict(attrs)
    return {k: v for k, v in attrs.items() if k in wanted}


def _fill_empty(out: dict[str, Any], wanted: frozenset[str] | None, defaults: frozenset[str]) -> None:
    # Required return attributes are present even when empty (PS3.18: zero-length value).
    for tag in wanted if wanted is not None else defaults:
        if tag not in out and tag != "00081190":
            out[tag] = {"vr": A.vr_of(tag)}


def _finish(out: dict[str, Any], wanted: frozenset[str] | None, defaults: frozenset[str]) -> dict[str, Any]:
    _fill_empty(out, wanted, defaults)
    if "00080005" in out:
        out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}  # the JSON is UTF-8 whatever came in
    return dict(sorted(out.items()))


def _paged(stmt: Select[Any], query: Query) -> Select[Any]:
    if query.limit < 0 or query.offset < 0:
        raise BadRequest("limit and offset must not be negative")
    return stmt.limit(query.limit + 1).offset(query.offset)


def _issuer(row: Any) -> dict[str, Any]:
    """IssuerOfPatientID as answered: the object's own value, else the issuer the broker
    qualified its Patient ID with (the sending facility's)."""
    value = row.issuer_in_data or row.issuer
    return {"vr": "LO", "Value": [value]} if value else {"vr": "LO"}


def _study_attrs(row: Any, wanted: frozenset[str] | None, base: str | None) -> dict[str, Any]:
    attrs = orjson.loads(row.study_json)
    out = _pick(attrs, wanted)
    mods = [m for m in row.modalities.split("\\") if m]
    computed = {
        "00080061": {"vr": "CS", "Value": mods} if mods else {"vr": "CS"},
        "00201206": {"vr": "IS", "Value": [row.num_series]},
        "00201208": {"vr": "IS", "Value": [row.num_instances]},
        # NEARLINE when only a facility's archive holds the pixels (index sync); ONLINE once here.
        "00080056": attrs.get("00080056") or {"vr": "CS", "Value": ["ONLINE"]},
        "00100021": _issuer(row),
        "0020000D": {"vr": "UI", "Value": [row.study_uid]},
    }
    if base:
        computed["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{row.study_uid}"]}
    for tag, value in computed.items():
        if wanted is None or tag in wanted or tag == "0020000D":
            out[tag] = value
    return out


_STUDY_ORDER = {
    "pk": (_study.c.pk,),
    "date": (_study.c.study_date, _study.c.study_time, _study.c.pk),
    "-date": (_study.c.study_date.desc(), _study.c.study_time.desc(), _study.c.pk.desc()),
}


def count(*, session: Session, query: Query) -> int:
    """How many studies match a study-level query, whatever its page (FHIR's Bundle.total)."""
    if query.level != "study":
        raise BadRequest("only study-level matches are counted")
    conds, _asked, _ignored = _filters(query, session.get_bind().dialect.name)
    return int(session.execute(select(func.count()).select_from(_study).where(*conds)).scalar_one())


def study_owners(*, session: Session, study_uids: list[str]) -> dict[str, StudyOwner]:
    """Whose each study is and where it came from: facility, the broker-qualified patient
    identifier and the patient's person (one indexed query)."""
    if not study_uids:
        return {}
    rows = session.execute(
        select(
            _study.c.study_uid,
            _study.c.facility_id,
            _study.c.issuer,
            _study.c.patient_id,
            _patient.c.person_id,
        )
        .join(_patient, _patient.c.pk == _study.c.patient_pk)
        .where(_study.c.study_uid.in_(study_uids))
    ).all()
    return {
        r.study_uid: StudyOwner(
            facility_id=r.facility_id, issuer=r.issuer, patient_id=r.patient_id, person_id=r.person_id
        )
        for r in rows
    }


def search(*, session: Session, query: Query) -> QueryResult:
    """Answer one query at any level; raises BadRequest for keys or values that cannot match."""
    if query.limit > 100_000:
        raise BadRequest("limit is too large")
    conds, asked, ignored = _filters(query, session.get_bind().dialect.name)
    level = query.level
    base = query.retrieve_base
    matches: list[dict[str, Any]] = []
    if level == "patient":
        wanted = _wanted(query, A.PATIENT_DEFAULTS, asked)
        mine = _study.c.patient_pk == _patient.c.pk
        counts = [select(func.count()).select_from(_study).where(mine).scalar_subquery().label("n_studies")]
        # The series and instance totals only when asked: each is one more subquery per row.
        wants_series = wanted is None or "00201202" in wanted
        wants_instances = wanted is None or "00201204" in wanted
        if wants_series:
            total = func.coalesce(func.sum(_study.c.num_series), 0)
            counts.append(select(total).where(mine).scalar_subquery().label("n_series"))
        if wants_instances:
            total = func.coalesce(func.sum(_study.c.num_instances), 0)
            counts.append(select(total).where(mine).scalar_subquery().label("n_instances"))
        stmt = _paged(select(_patient, *counts).where(*conds).order_by(_patient.c.pk), query)
        rows = session.execute(stmt).all()
        for row in rows[: query.limit]:
            attrs = {
                # Every component group the name has, as the study level answers from its JSON.
                "00100010": {"vr": "PN", "Value": [pn_json(row.patient_name)]}
                if row.patient_name
                else {"vr": "PN"},
                "00100020": {"vr": "LO", "Value": [row.patient_id]}
                if not row.patient_id.startswith("~no-id~")
                else {"vr": "LO"},
                "00100021": {"vr": "LO", "Value": [row.issuer]},
                "00100030": {"vr": "DA", "Value": [row.birth_date]} if row.birth_date else {"vr": "DA"},
                "00100040": {"vr": "CS", "Value": [row.sex]} if row.sex else {"vr": "CS"},
                "00201200": {"vr": "IS", "Value": [row.n_studies]},
            }
            if wants_series:
                attrs["00201202"] = {"vr": "IS", "Value": [int(row.n_series)]}
            if wants_instances:
                attrs["00201204"] = {"vr": "IS", "Value": [int(row.n_instances)]}
            matches.append(_finish(_pick(attrs, wanted), wanted, A.PATIENT_DEFAULTS))
    elif level == "study":
        wanted = _wanted(query, A.STUDY_DEFAULTS, asked)
        stmt = _paged(select(_study).where(*conds).order_by(*_STUDY_ORDER[query.order]), query)
        rows = session.execute(stmt).all()
        for row in rows[: query.limit]:
            matches.append(_finish(_study_attrs(row, wanted, base), wanted, A.STUDY_DEFAULTS))
    elif level == "series":
        wanted = _wanted(query, A.SERIES_DEFAULTS, asked)
        order = (_series.c.series_number, _series.c.pk) if query.study_uid else (_series.c.pk,)
        stmt = _paged(
            select(
                _series,
                _study.c.study_uid,
                _study.c.study_json,
                _study.c.modalities,
                _study.c.num_series,
                _study.c.num_instances.label("study_num_instances"),
                _study.c.issuer,
                _study.c.issuer_in_data,
            )
            .join(_study, _study.c.pk == _series.c.study_pk)
            .where(*conds)
            .order_by(*order),
            query,
        )
        rows = session.execute(stmt).all()
        for row in rows[: query.limit]:
            out = _pick(orjson.loads(row.study_json), wanted if wanted is not None else frozenset(asked))
            out.pop("00080056", None)
            out.update(_pick(orjson.loads(row.series_json), wanted))
            out["0020000D"] = {"vr": "UI", "Value": [row.study_uid]}
            out["0020000E"] = {"vr": "UI", "Value": [row.series_uid]}
            study_attrs = orjson.loads(row.study_json)
            computed = {
                "00201209": {"vr": "IS", "Value": [row.num_instances]},
                "00080056": study_attrs.get("00080056") or {"vr": "CS", "Value": ["ONLINE"]},
            }
            if base:
                computed["00081190"] = {
                    "vr": "UR",
                    "Value": [f"{base}/studies/{row.study_uid}/series/{row.series_uid}"],
                }
            for tag, value in computed.items():
                if wanted is None or tag in wanted:
                    out[tag] = value
            if "00100021" in (wanted if wanted is not None else asked):
                out["00100021"] = _issuer(row)
            matches.append(_finish(out, wanted, A.SERIES_DEFAULTS))
    else:
        wanted = _wanted(query, A.INSTANCE_DEFAULTS, asked)
        order = (_inst.c.instance_number, _inst.c.pk) if query.series_uid else (_inst.c.pk,)
        stmt = _paged(
            select(
                _inst.c.sop_uid,
                _inst.c.metadata_json,
                _series.c.series_uid,
                _study.c.study_uid,
                _study.c.issuer,
                _study.c.issuer_in_data,
            )
            .join(_series, _series.c.pk == _inst.c.series_pk)
            .join(_study, _study.c.pk == _inst.c.study_pk)
            .where(*conds)
            .order_by(*order),
            query,
        )
        rows = session.execute(stmt).all()
        for row in rows[: query.limit]:
            meta = orjson.loads(unpack_metadata(row.metadata_json))
            # Bulk data is for WADO-RS metadata, never for a query answer (nor inside sequences);
            # values are bounded like every other level's (the metadata keeps them whole).
            out = bound_dataset(without_bulk(_pick(meta, wanted)))
            out["0020000D"] = {"vr": "UI", "Value": [row.study_uid]}
            out["0020000E"] = {"vr": "UI", "Value": [row.series_uid]}
            out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
            if "00100021" in out or (wanted is not None and "00100021" in wanted):
                out["00100021"] = _issuer(row)
            if base:
                out["00081190"] = {
                    "vr": "UR",
                    "Value": [
                        f"{base}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}"
                    ],
                }
            matches.append(_finish(out, wanted, A.INSTANCE_DEFAULTS))
    warnings = []
    if ignored:
        warnings.append(
            "The following attributes are not supported for matching and were ignored: "
            + ", ".join(sorted(set(ignored)))
        )
    return QueryResult(matches=matches, more=len(rows) > query.limit, warnings=warnings)
