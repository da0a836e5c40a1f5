"""QIDO-RS query strings (PS3.18 8.3.4) -> the index's `Query`.

The raw query string is parsed here rather than by the framework so that a query means the
same whatever its characters arrive as: `*` or `%2A`, `,` or `%2C`, a space as `+` or `%20`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from broker.dicom.attributes import keyword_of, resolve_key
from broker.dicomweb.multipart import parse_media_type
from broker.errors import BadRequest, NotAcceptable
from broker.index.schemas import Level, Query

# Optional PS3.18 8.3.4 parameters this origin server does not implement: PS3.18 lets an origin
# server ignore them as long as it says so in a Warning header (as 8.3.4.2 spells out for
# fuzzymatching), so they are ignored with a warning rather than refused.
_UNSUPPORTED_OPTIONAL = ("emptyvaluematching", "multiplevaluematching")
# An offset past any archive: larger values are clamped (they match nothing either way) so
# that a database integer never overflows.
_MAX_OFFSET = 10**12


@dataclass
class ParsedQuery:
    query: Query
    warnings: list[str] = field(default_factory=list)
    # PS3.18 8.3.3.1-2: the `accept` and `charset` query parameters, which a link in a browser
    # uses for what the Accept header would say; they take precedence over the headers.
    accept: str | None = None
    charset: str | None = None


def _decoded(raw: str, what: str) -> str:
    """A query string name or value, percent-decoded as the UTF-8 PS3.18 8.3.1 prescribes.

    Anything else (Latin-1 `%FC` for `ü`) is refused: read leniently it would become U+FFFD and
    search for another value, answering "no such study" instead of saying what is wrong. The
    message names the parameter, not the value (which may be a patient's name)."""
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not percent-encoded UTF-8 (PS3.18 8.3.1)") from exc


def _uint(name: str, value: str) -> int:
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise BadRequest(f"{name} must be an unsigned integer, got {value[:40]!r}")
    return int(text[:30]) if len(text) <= 30 else 10**30


def _attribute_key(raw: str) -> str:
    """A match or includefield key (keyword or tag, dotted for sequences) -> keywords, dotted."""
    parts = raw.split(".")
    out = []
    for part in parts:
        tag = resolve_key(part)
        if tag is None:
            raise BadRequest(f"unknown query key {raw[:64]!r}: not a DICOM keyword or tag (PS3.18 8.3.4.1)")
        out.append(keyword_of(tag))
    return ".".join(out)


def parse_query(
    raw_query: str,
    *,
    level: Level,
    default_limit: int,
    max_limit: int,
    study_uid: str | None = None,
    series_uid: str | None = None,
    facility_id: str | None = None,
    retrieve_base: str | None = None,
) -> ParsedQuery:
    filters: dict[str, str] = {}
    includefields: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    warnings: list[str] = []
    accept: str | None = None
    charset: str | None = None
    seen_params: set[str] = set()
    repeated: dict[str, list[str]] = {}
    for item in raw_query.split("&") if raw_query else []:
        if not item:
            continue
        raw_name, _eq, raw_value = item.partition("=")
        name = _decoded(raw_name, "a query parameter name").strip()
        value = _decoded(raw_value, f"the value of {name[:64]!r}")
        if not name:
            # An empty key (`?&includefield=...`, `a=1&&b=2`, as some viewers send) names no
            # attribute: nothing to match or return, so it is skipped rather than refused.
            continue
        lname = name.lower()
        if lname == "includefield":
            for f in value.split(","):
                f = f.strip()
                if not f:
                    continue
                if f.lower() == "all":
                    include_all = True
                else:
                    # A sequence path returns its whole top-level sequence.
                    includefields.add(_attribute_key(f).split(".")[0])
            continue
        if lname in ("limit", "offset", "fuzzymatching", "accept", "charset") and lname in seen_params:
            raise BadRequest(f"query parameter {lname!r} given more than once")
        seen_params.add(lname)
        if lname == "limit":
            limit = _uint("limit", value)
            if limit == 0:
                raise BadRequest("limit must be at least 1")
        elif lname == "offset":
            offset = min(_uint("offset", value), _MAX_OFFSET)
        elif lname == "fuzzymatching":
            v = value.strip().lower()
            if v not in ("true", "false"):
                raise BadRequest(f"fuzzymatching must be true or false, got {value[:20]!r}")
            fuzzy = v == "true"
        elif lname == "accept":
            accept = value
        elif lname == "charset":
            charset = value
        elif lname in _UNSUPPORTED_OPTIONAL:
            warnings.append(f"The {lname} parameter is not supported and was ignored.")
        else:
            key = _attribute_key(name)
            if "." in key:
                warnings.append(f"Matching on sequence attributes is not supported: {key} was ignored.")
                continue
            # A repeated key is a list of values, any of which matches (as uid-list-match is).
            repeated.setdefault(key, []).append(value)
            filters.setdefault(key, value)
    if limit is None:
        limit = default_limit
    elif limit > max_limit:
        warnings.append(f"limit was lowered to this origin server's maximum of {max_limit}.")
        limit = max_limit
    query = Query(
        level=level,
        filters=filters,
        any_of={k: tuple(v) for k, v in repeated.items() if len(v) > 1},
        study_uid=study_uid,
        series_uid=series_uid,
        facility_id=facility_id,
        fuzzy=fuzzy,
        includefields="all" if include_all else frozenset(includefields),
        limit=limit,
        offset=offset,
        retrieve_base=retrieve_base,
    )
    return ParsedQuery(query=query, warnings=warnings, accept=accept, charset=charset)


def negotiate_charset(charset: str | None) -> None:
    """The `charset` query parameter (PS3.18 8.3.3.2): responses are UTF-8 (PS3.18 F.2), so the
    list must allow it (`utf-8`, `*`; with q > 0); 406 otherwise. Absent: anything goes."""
    if charset is None:
        return
    for item in charset.split(","):
        # A charset with parameters reads as a media type does (`name;q=0.5`).
        ranged = parse_media_type(item)
        try:
            q = float(ranged.params.get("q", "1"))
        except ValueError:
            raise BadRequest(f"charset has a malformed q value: {item.strip()[:40]!r}") from None
        if ranged.type in ("utf-8", "utf8", "*") and q > 0:
            return
    raise NotAcceptable("responses are encoded in UTF-8 only (charset=utf-8)")
