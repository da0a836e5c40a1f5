"""Fellegi–Sunter record matching: normalisation, blocking keys, comparison levels, scoring, EM.

No database here: pure functions over `Demographics`, so the same code scores one record online
(service.py), trains m/u offline (`estimate_parameters`) and is unit-tested without fixtures.

A comparison turns a pair of records into one *level* per field (0 = best agreement, -1 = a
value is missing). Each level has m = P(level | same person) and u = P(level | different
people); the pair's match weight is the sum of log2(m/u) over the fields (missing fields add
nothing). For exact name agreement u is replaced by the name's frequency in the data (term
frequency adjustment: SMITH = SMITH is weaker evidence than ZYLBERSZTEJN = ZYLBERSZTEJN).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import date
from typing import Any, NamedTuple

import jellyfish
import numpy as np

FIELDS: tuple[str, ...] = ("family", "given", "middle", "birth_date", "sex", "address", "phone")
NAME_FIELDS = ("family", "given")
# Fields that can carry a match besides the name: an auto-link needs one of them to agree.
CORROBORATING = ("birth_date", "address", "phone")

LEVEL_LABELS: dict[str, tuple[str, ...]] = {
    "family": ("exact", "jaro-winkler>=0.92", "similar", "different"),
    "given": ("exact", "jaro-winkler>=0.92", "similar", "different"),
    "middle": ("exact", "initial or close", "different"),
    "birth_date": ("exact", "one typo or day/month swapped", "two edits", "different"),
    "sex": ("same", "different"),
    "address": ("same", "mostly same", "partly same", "different"),
    "phone": ("exact", "one typo", "different"),
}

# Starting values (used until `estimate_parameters` has run on real data); u of exact birth
# date ~ 1 / (365 * 80); names get term-frequency-adjusted u at scoring time.
DEFAULT_PARAMS: dict[str, Any] = {
    "m": {
        "family": [0.85, 0.08, 0.04, 0.03],
        "given": [0.85, 0.07, 0.04, 0.04],
        "middle": [0.80, 0.15, 0.05],
        "birth_date": [0.88, 0.08, 0.02, 0.02],
        "sex": [0.98, 0.02],
        "address": [0.70, 0.15, 0.08, 0.07],
        "phone": [0.85, 0.05, 0.10],
    },
    "u": {
        "family": [0.003, 0.002, 0.02, 0.975],
        "given": [0.01, 0.004, 0.03, 0.956],
        "middle": [0.05, 0.10, 0.85],
        "birth_date": [0.00004, 0.0006, 0.005, 0.99436],
        "sex": [0.5, 0.5],
        "address": [0.0005, 0.002, 0.01, 0.9875],
        "phone": [0.0001, 0.001, 0.9989],
    },
    "lambda": 0.0001,
}

# Values that mean "no name": never evidence of identity.
_PLACEHOLDER_NAMES = frozenset(
    {
        "UNKNOWN",
        "UNK",
        "ANONYMOUS",
        "ANON",
        "NONE",
        "NULL",
        "NA",
        "N A",
        "TEST",
        "PATIENT",
        "NONAME",
        "X",
        "XX",
        "XXX",
        "NN",
        "BABY",
        "DOE",
    }
)
_NON_NAME = re.compile(r"[^A-Z' -]")
_SPACES = re.compile(r"\s+")
_TOKEN = re.compile(r"[A-Z0-9]+")


@dataclass(frozen=True, slots=True)
class Demographics:
    """Normalised demographics, '' when unknown: upper case, Latin letters in ASCII, other
    scripts kept (`normalize_name_part`, `normalize_address`)."""

    family: str = ""
    given: str = ""
    middle: str = ""
    birth_date: str = ""  # YYYYMMDD, a real calendar date
    sex: str = ""  # M | F | O
    address: str = ""
    phone: str = ""

    def swapped(self) -> Demographics:
        return replace(self, family=self.given, given=self.family)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# ---------------------------------------------------------------- normalisation


# Blocks of Latin letters, IPA and modifier letters, letter-like symbols and number forms,
# full-width ASCII: characters the Latin rule has always read (most to nothing).
_LATIN_BLOCKS = (
    (0x0000, 0x0370),
    (0x1D00, 0x1F00),
    (0x2000, 0x2C00),
    (0x2C60, 0x2C80),
    (0xA720, 0xA800),
    (0xAB30, 0xAB70),
    (0xFB00, 0xFB07),
    (0xFF00, 0xFF5F),
)


def _script(c: str, current: str) -> str:
    """Which rule a character of a name takes: "latin" (Latin letters and everything that is no
    letter: digits, spaces, symbols), "greek", or "other"; a mark takes its letter's."""
    category = unicodedata.category(c)
    if category.startswith("M"):
        return current
    code = ord(c)
    if not category.startswith("L") or any(lo <= code < hi for lo, hi in _LATIN_BLOCKS):
        return "latin"
    name = unicodedata.name(c, "")
    if name.startswith("LATIN"):
        return "latin"
    return "greek" if name.startswith("GREEK") else "other"


def _runs(text: str) -> list[tuple[str, str]]:
    """`text` cut into runs of one `_script` each, in order."""
    runs: list[tuple[str, list[str]]] = []
    for c in text:
        script = _script(c, runs[-1][0] if runs else "latin")
        if runs and runs[-1][0] == script:
            runs[-1][1].append(c)
        else:
            runs.append((script, [c]))
    return [(script, "".join(chars)) for script, chars in runs]


def _greek_upper(run: str) -> str:
    decomposed = unicodedata.normalize("NFKD", run)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


def _name_upper(text: str) -> str:
    """A name upper-cased for matching. Latin as it always was: ASCII after NFKD (MÜLLER ->
    MULLER; a letter with no ASCII form, Ø or Ł, is dropped as before), so nothing changes for
    a Latin name. Letters of other scripts are kept, in their NFKC form (ﾔﾏﾀﾞ is ヤマダ) and
    upper-cased where the script has case. Greek loses its accents as Latin does (Greek capitals
    are written without tonos); every other script keeps its marks (ダ is not タ, शर्मा keeps
    its vowel signs). Before, every non-Latin letter was dropped: ИВАНОВ, 王 or 김 had no name.

    Ø, Ł, Đ, Æ, ß stay dropped here though addresses spell them (`_address_upper`): a name is
    stored normalised and its blocking keys are rebuilt from what is stored, so spelling them
    would leave every stored ØRSTED as RSTED, keyed as RSTED, against each new ORSTED."""
    if text.isascii():
        return text.upper()
    out = []
    for script, run in _runs(text):
        if script == "latin":
            out.append(unicodedata.normalize("NFKD", run).encode("ascii", "ignore").decode("ascii"))
        elif script == "greek":
            out.append(_greek_upper(run))
        else:
            out.append(unicodedata.normalize("NFKC", run))
    return "".join(out).upper()


def _is_name_char(c: str) -> bool:
    """A letter of any script, or a mark on one (Devanagari vowel signs are marks)."""
    return c.isalpha() or unicodedata.category(c).startswith("M")


def normalize_name_part(text: str | None) -> str:
    if not text:
        return ""
    raw = _name_upper(str(text))
    # A name made of digits or symbols is garbage, not a name with the junk stripped off.
    letters = sum(_is_name_char(c) for c in raw)
    if letters == 0 or letters < len(raw.replace(" ", "")) / 2:
        return ""
    if raw.isascii():
        kept = _NON_NAME.sub(" ", raw)
    else:
        kept = "".join(c if _is_name_char(c) or c in "' -" else " " for c in raw)
    cleaned = _SPACES.sub(" ", kept).strip(" -'")
    cleaned = cleaned.replace("'", "")
    if not cleaned or cleaned in _PLACEHOLDER_NAMES:
        return ""
    return cleaned[:128]


def _split_name(group: str) -> tuple[str, str, str]:
    if "^" in group:
        parts = group.split("^")
    elif "," in group:  # "FAMILY, GIVEN" from systems that ignore PN rules
        parts = [p.strip() for p in group.split(",", 1)]
    else:
        parts = [group]
    parts += [""] * (3 - len(parts))
    family, given, middle = (normalize_name_part(p) for p in parts[:3])
    if given and not middle and " " in given:
        given, middle = given.split(" ", 1)
    return family, given, middle


def parse_person_name(pn: str | None) -> tuple[str, str, str]:
    """DICOM PN (family^given^middle^prefix^suffix) -> (family, given, middle), from the
    Alphabetic component group; from the Ideographic, else the Phonetic one when the Alphabetic
    group holds no name (`=山田^太郎`), so a name a site sends only in those groups still counts."""
    if not pn:
        return "", "", ""
    groups = str(pn).split("=")[:3]
    for group in groups:
        found = _split_name(group)
        if found[0] or found[1]:
            return found
    return _split_name(groups[0])


# ISO 21090 name representations (the FHIR extension's codes) of a record's other names: a
# PatientName's Ideographic and Phonetic groups, HL7 XPN.8 I and P.
IDEOGRAPHIC, PHONETIC = "IDE", "SYL"


class OtherName(NamedTuple):
    """A name a record is also searched by (never compared when linking), normalised as the
    record's own name is, and the representation it was written in (IDEOGRAPHIC, PHONETIC)."""

    family: str
    given: str
    representation: str


def other_names(pn: str | None) -> tuple[OtherName, ...]:
    """The Ideographic and Phonetic groups of a DICOM PN, normalised as the record's own name is
    (`Yamada^Tarou=山田^太郎=やまだ^たろう`: (山田, 太郎, IDE), (やまだ, たろう, SYL)): the names a
    record is also searched by. Groups that hold no name are left out, and so is a group that
    reads as the same (family, given) as the one before it."""
    out: list[OtherName] = []
    groups = str(pn or "").split("=")[1:3]
    for group, representation in zip(groups, (IDEOGRAPHIC, PHONETIC), strict=False):
        family, given, _middle = _split_name(group)
        add_other_name(out, OtherName(family, given, representation))
    return tuple(out)


def add_other_name(names: list[OtherName], name: OtherName) -> None:
    """Append `name` unless it holds no name or its (family, given) is there already (in
    another representation: the first one kept is the one stored, one row per name)."""
    if (name.family or name.given) and all((n.family, n.given) != (name.family, name.given) for n in names):
        names.append(name)


# No one living (or recorded in an archive we serve) was born earlier: an earlier year is a typo or
# a placeholder such as 0001-01-01, and would otherwise match every other placeholder.
EARLIEST_YEAR = 1850


def normalize_date(text: str | None, *, today: date | None = None, lenient: bool = False) -> str:
    """YYYYMMDD (or YYYY-MM-DD) of a real past date from EARLIEST_YEAR on, else ''.

    `lenient` keeps an impossible month/day (19310175) from a DICOM header: a typo there is
    still evidence against the right date, and rejecting the study for it would lose images.
    """
    if not text:
        return ""
    digits = str(text).strip().replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return ""
    try:
        value = date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        this_year = (today or date.today()).year
        return digits if lenient and EARLIEST_YEAR <= int(digits[:4]) <= this_year else ""
    if value.year < EARLIEST_YEAR or value > (today or date.today()):
        return ""
    return digits


def date_refusal(name: str, text: str) -> str:
    """Why `normalize_date` refused `text`, for the caller who typed it: a date that exists but
    lies outside the range is told the range (0001-01-01 is a real date, and calling it unreal
    sends the user looking for a typo that is not there)."""
    digits = text.strip().replace("-", "")
    if len(digits) == 8 and digits.isdigit():
        try:
            date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
        except ValueError:
            pass
        else:
            return f"{name} must be from {EARLIEST_YEAR}-01-01 to today (YYYY-MM-DD)"
    return f"{name} must be a real date (YYYY-MM-DD)"


def normalize_sex(text: str | None) -> str:
    first = (text or "").strip()[:1].upper()
    return first if first in ("M", "F", "O") else ""


# Latin letters with no ASCII decomposition, spelled as addresses (and postal services) write
# them in ASCII. NFKD leaves them whole, so the ASCII fold used to drop them: ØSTERGADE was
# STERGADE, MÜLLERSTRAßE MULLERSTRAE.
_LATIN_SPELLED = {
    "ß": "SS",
    "ẞ": "SS",
    "Æ": "AE",
    "æ": "AE",
    "Œ": "OE",
    "œ": "OE",
    "Ø": "O",
    "ø": "O",
    "Ł": "L",
    "ł": "L",
    "Đ": "D",
    "đ": "D",
    "Ð": "D",
    "ð": "D",
    "Þ": "TH",
    "þ": "TH",
    "Ħ": "H",
    "ħ": "H",
    "ı": "I",
    "Ŧ": "T",
    "ŧ": "T",
}


def _latin_address_char(c: str) -> str:
    """One character of a Latin run of an address in ASCII: a digit of any script as its ASCII
    digit (٣, ३, ３ are 3), a letter folded or spelled, a mark dropped with its letter's accent,
    and punctuation, a space or a symbol with no ASCII form (’, –, −, 、) a space, as ASCII
    punctuation is: the minus of 9−1 must not make house 91."""
    if c.isascii():
        return c
    digit = unicodedata.decimal(c, None)
    if digit is not None:
        return str(digit)
    folded = unicodedata.normalize("NFKD", _LATIN_SPELLED.get(c, c)).encode("ascii", "ignore").decode("ascii")
    if folded or unicodedata.category(c) in _JOINING:
        return folded
    return " "


# Categories that join the letters around them when they have no ASCII form: a letter or mark
# (dropped, as names drop them), a soft hyphen or zero-width (non-)joiner, which sit inside a
# word (HAUPT-STRASSE split at a line's end; Persian puts ZWNJ inside words), and unassigned.
_JOINING = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Cf", "Cn", "Co"})


def _address_upper(text: str) -> str:
    """An address upper-cased for matching, its scripts read as names' are (`_name_upper`) but
    for Latin, whose letters with no ASCII form are spelled (`_LATIN_SPELLED`), and digits and
    punctuation (`_latin_address_char`)."""
    out = []
    for script, run in _runs(text):
        if script == "latin":
            out.append("".join(_latin_address_char(c) for c in run))
        elif script == "greek":
            out.append(_greek_upper(run))
        else:
            out.append(unicodedata.normalize("NFKC", run))
    return "".join(out).upper()


def _address_tokens(text: str) -> list[str]:
    """Tokens of an `_address_upper` text: runs of ASCII letters and digits as `_TOKEN` reads
    them (12B is one token), and of letters of other scripts, which a digit run always starts
    or ends: Han and kana run a street, its house number and 号 or 丁目 together, and 88号 and
    89号 are different houses, not one long word with a typo."""
    tokens: list[str] = []
    start, previous = -1, ""
    for i, c in enumerate(text + " "):
        kind = "digit" if "0" <= c <= "9" else "ascii" if "A" <= c <= "Z" else "" if c.isascii() else "other"
        if start >= 0 and (not kind or {kind, previous} == {"digit", "other"}):
            tokens.append(text[start:i])
            start = -1
        if kind and start < 0:
            start = i
        previous = kind
    return tokens


def normalize_address(text: str | None) -> str:
    """Upper-case tokens of an address, one space between. ASCII as it always was (stored
    addresses and their blocking keys stay valid); letters of every other script kept
    (`_address_upper`), where before each was dropped and every Cyrillic or Han address was its
    digits alone."""
    if not text:
        return ""
    text = str(text)
    if text.isascii():
        return " ".join(_TOKEN.findall(text.upper()))[:512]
    return " ".join(_address_tokens(_address_upper(text)))[:512]


def normalize_phone(text: str | None) -> str:
    digits = re.sub(r"\D", "", str(text or ""))
    return digits[-15:] if len(digits) >= 6 else ""


def demographics(
    *,
    patient_name: str | None = None,
    family: str | None = None,
    given: str | None = None,
    middle: str | None = None,
    birth_date: str | None = None,
    sex: str | None = None,
    address: str | None = None,
    phone: str | None = None,
    lenient_date: bool = False,
) -> Demographics:
    """Build normalised demographics from a PN string and/or separate components."""
    f, g, m = parse_person_name(patient_name)
    f = normalize_name_part(family) or f
    g = normalize_name_part(given) or g
    m = normalize_name_part(middle) or m
    if g and not m and " " in g:
        g, m = g.split(" ", 1)
    return Demographics(
        family=f,
        given=g,
        middle=m,
        birth_date=normalize_date(birth_date, lenient=lenient_date),
        sex=normalize_sex(sex),
        address=normalize_address(address),
        phone=normalize_phone(phone),
    )


# ---------------------------------------------------------------- blocking


def _phonetic(name: str) -> str:
    """Soundex of a Latin name. Soundex knows only A-Z: of any other letter it keeps the first
    and codes nothing else (ИВАНОВ and ИГОРЕВ would both be И000, and block together with every
    name that starts with И). A name in another script is blocked on its first six letters as
    they are: no typo tolerance in the key, which the birth date and address keys make up for."""
    letters = "".join(c for c in name if c.isalpha())
    if not letters:
        return ""
    if letters.isascii():
        return jellyfish.soundex(letters)
    return "~" + letters[:6]


# The version of `block_keys`: bump it with every change to the keys a record gets. Records
# stored under an older version keep their old keys until `service.rebuild_keys` recomputes
# them (queued at startup by `service.ensure_keys_current`); until then a new record can miss
# them as candidates. 2: keys on street + town, birth month + initials, street + family name.
# Address words in other scripts (`_word_code`) needed no new version: every stored address
# was ASCII until then, and the keys of an ASCII address are what they were.
KEYS_VERSION = 2


def block_keys(d: Demographics) -> set[str]:
    """Keys stored for a record. Each catches a different kind of error in the others."""
    keys: set[str] = set()
    dob, f, g = d.birth_date, _phonetic(d.family), _phonetic(d.given)
    if dob:
        keys.add("d:" + dob)  # any name typo, same birth date
        # Sorted-neighbourhood-like: birth month and both initials, for a typo in the day
        # and one in each name (GILLARD JAKE 19590828 / GILLATD JAKD 19590808).
        if d.family and d.given:
            keys.add("di:" + dob[:6] + d.family[0] + d.given[0])
        if f:
            keys.add("fm:" + f + dob[:6])  # day typo
            keys.add("fd:" + f + dob[:4] + dob[6:])  # month typo
        if g:
            keys.add("gm:" + g + dob[4:])  # year typo, family name changed
    if f and g:
        keys.add("fg:" + f + g)  # birth date missing or badly wrong
    # Address: catches a replaced or badly mistyped name when the birth date is missing too.
    postcode = next((t for t in reversed(d.address.split()) if t.isdigit() and len(t) >= 4), "")
    if postcode:
        if f:
            keys.add("fp:" + f + postcode)
        if g:
            keys.add("gp:" + g + postcode)
    street = _street_token(d.address)
    if street and (f or g):
        keys.add("st:" + street + (dob[:4] if dob else f or g))
        if dob and f:
            keys.add("st:" + street + f)  # birth year wrong too, or the given name replaced
    # Address alone (street word + the town, phonetically): the last resort when both names
    # and the birth date are missing or wrong, and it survives a mistyped postcode. One key
    # per leading long word, because sources put the street and the building name in either
    # order. A block of flats or a care home makes the key crowded, and crowded keys are
    # dropped at query time, so this costs nothing where it says nothing.
    words = _long_words(d.address)
    if len(words) >= 2:
        town = _word_code(words[-1])
        for w in dict.fromkeys(words[:2]):
            if w != words[-1]:
                keys.add("sb:" + _word_code(w) + town)
    return keys


def _is_word(token: str) -> bool:
    """Letters only, of any script: `str.isalpha` alone says no to a Devanagari word, whose
    vowel signs are marks."""
    return token.isalpha() or (not token.isascii() and all(_is_name_char(c) for c in token))


def _word_code(word: str) -> str:
    """Soundex of a Latin word; of a word in another script its first six letters, as
    `_phonetic` keys names (Soundex would code ЛЕНИНСКИЙ and ЛЕСНАЯ both Л000)."""
    return jellyfish.soundex(word) if word.isascii() else "~" + word[:6]


def _long_words(address: str) -> list[str]:
    return [t for t in address.split() if len(t) >= 5 and _is_word(t) and t not in _STREET_TYPES]


# Street types say nothing about which street ("STREET" is in half of all addresses).
_STREET_TYPES = frozenset(
    {"STREET", "AVENUE", "CRESCENT", "CIRCUIT", "PLACE", "DRIVE", "COURT", "CLOSE", "TERRACE", "PARADE"}
    | {"HIGHWAY", "STRASSE", "GARDEN", "GARDENS", "SQUARE", "STATION", "VILLAGE", "ESTATE"}
)


def _street_token(address: str) -> str:
    """The first long word of an address (usually the street name), phonetically."""
    word = next((t for t in address.split() if len(t) >= 5 and _is_word(t)), "")
    return _word_code(word) if word else ""


def query_keys(d: Demographics) -> set[str]:
    """Keys to look up for a new record: its own and those of its swapped-name reading."""
    return block_keys(d) | block_keys(d.swapped())


# ---------------------------------------------------------------- comparison


def _name_level(a: str, b: str) -> int:
    if not a or not b:
        return -1
    if a == b:
        return 0
    jw = jellyfish.jaro_winkler_similarity(a, b)
    if jw >= 0.92:
        return 1
    return 2 if jw >= 0.80 or typo_like(a, b) else 3


def typo_like(a: str, b: str) -> bool:
    """Short names one keystroke apart (ROY/RIY, KYLE/KYLB) or one cut short (TEA/TEAL):
    Jaro-Winkler scores these low only because the names are short. The first letter must
    agree, so rhyming sibling names (MIA/PIA, AVA/EVA) stay different."""
    if not a or not b or a[0] != b[0]:
        return False
    if min(len(a), len(b)) >= 3 and (a.startswith(b) or b.startswith(a)):
        return True
    return jellyfish.damerau_levenshtein_distance(a, b) <= 1


def _given_level(a: Demographics, b: Demographics) -> int:
    """Given names, also read with the middle name run on: a space typed into a given name
    (JA YDE) splits it into given + middle, and JOHN PAUL may arrive as JOHN^PAUL or JOHNPAUL."""
    level = _name_level(a.given, b.given)
    if level <= 0 or not (a.middle or b.middle):
        return level
    joined = _name_level(a.given + a.middle, b.given + b.middle)
    return level if joined < 0 else min(level, max(joined, 1))


def _middle_level(a: str, b: str) -> int:
    if not a or not b:
        return -1
    if a == b:
        return 0
    if a[0] == b[0] and (len(a) == 1 or len(b) == 1):
        return 1
    return 1 if jellyfish.jaro_winkler_similarity(a, b) >= 0.9 else 2


def _date_level(a: str, b: str) -> int:
    if not a or not b:
        return -1
    if a == b:
        return 0
    if a[:4] + a[6:8] + a[4:6] == b:  # day and month swapped (US vs European order)
        return 1
    dist = jellyfish.damerau_levenshtein_distance(a, b)
    return 1 if dist == 1 else 2 if dist == 2 else 3


def _address_level(a: str, b: str) -> int:
    if not a or not b:
        return -1
    if a == b:
        return 0
    ta, tb = a.split(), b.split()
    # A token agrees if the other side has it exactly or with a small typo.
    unmatched = list(tb)
    hits = 0
    for tok in ta:
        if tok in unmatched:
            unmatched.remove(tok)
            hits += 1
            continue
        for other in unmatched:
            if len(tok) > 3 and jellyfish.jaro_winkler_similarity(tok, other) >= 0.9:
                unmatched.remove(other)
                hits += 1
                break
    score = hits / max(len(ta), len(tb))
    return 0 if score >= 0.85 else 1 if score >= 0.55 else 2 if score >= 0.3 else 3


def _phone_level(a: str, b: str) -> int:
    if not a or not b:
        return -1
    if a == b:
        return 0
    return 1 if jellyfish.damerau_levenshtein_distance(a, b) == 1 else 2


def _sex_level(a: str, b: str) -> int:
    if not a or not b:
        return -1
    return 0 if a == b else 1


def compare_levels(a: Demographics, b: Demographics) -> tuple[list[int], bool]:
    """Levels for each of FIELDS, reading the names straight or swapped (whichever agrees more).

    A swapped reading never counts as exact agreement: it is evidence, but weaker.
    """
    straight = (_name_level(a.family, b.family), _given_level(a, b))
    crossed = (_name_level(a.family, b.given), _name_level(a.given, b.family))

    def goodness(levels: tuple[int, int]) -> int:
        return sum(4 - lv if lv >= 0 else 0 for lv in levels)

    swapped = goodness(crossed) > goodness(straight) + 1
    fam, giv = (
        (max(crossed[0], 1) if crossed[0] >= 0 else -1, max(crossed[1], 1) if crossed[1] >= 0 else -1)
        if swapped
        else straight
    )
    return [
        fam,
        giv,
        _middle_level(a.middle, b.middle),
        _date_level(a.birth_date, b.birth_date),
        _sex_level(a.sex, b.sex),
        _address_level(a.address, b.address),
        _phone_level(a.phone, b.phone),
    ], swapped


@dataclass(frozen=True, slots=True)
class Score:
    weight: float  # sum of log2 Bayes factors
    levels: tuple[int, ...]
    contributions: dict[str, dict[str, Any]]
    swapped: bool
    # Years between the two birth dates when both are known (0 otherwise): a plainly different
    # birth date a generation apart is the father/son pattern, a few years apart a wrong date.
    years_apart: int = 0

    def contribution(self, field: str) -> float:
        item = self.contributions.get(field)
        return float(item["weight"]) if item else 0.0


def score_pair(
    a: Demographics,
    b: Demographics,
    *,
    params: Mapping[str, Any],
    tf: dict[str, float] | None = None,
) -> Score:
    """Match weight of a pair with per-field contributions; `tf` gives the frequency of a's names."""
    levels, swapped = compare_levels(a, b)
    total = 0.0
    contributions: dict[str, dict[str, Any]] = {}
    for field, level in zip(FIELDS, levels, strict=True):
        if level < 0:
            continue
        m = params["m"][field][level]
        u = params["u"][field][level]
        if level == 0 and tf and field in tf and not swapped:
            u = tf[field]
        w = math.log2(max(m, 1e-9) / max(u, 1e-9))
        total += w
        contributions[field] = {
            "level": LEVEL_LABELS[field][level],
            "weight": round(w, 3),
        }
    if swapped:
        contributions["names"] = {"level": "given and family swapped", "weight": 0.0}
    years = 0
    if a.birth_date and b.birth_date:
        years = abs(int(a.birth_date[:4]) - int(b.birth_date[:4]))
    return Score(
        weight=total, levels=tuple(levels), contributions=contributions, swapped=swapped, years_apart=years
    )


def probability(weight: float, *, params: Mapping[str, Any]) -> float:
    """Posterior probability of a match given the prior share of matching pairs (lambda)."""
    lam = float(params.get("lambda", DEFAULT_PARAMS["lambda"]))
    prior = math.log2(lam / (1 - lam))
    return 1.0 / (1.0 + 2.0 ** -(weight + prior))


# ---------------------------------------------------------------- estimation (EM)


def level_matrix(pairs: list[tuple[Demographics, Demographics]]) -> np.ndarray:
    out = np.empty((len(pairs), len(FIELDS)), dtype=np.int8)
    for i, (a, b) in enumerate(pairs):
        out[i] = compare_levels(a, b)[0]
    return out


def estimate_u(
    levels: np.ndarray,
    *,
    prior: dict[str, Any] = DEFAULT_PARAMS,
    match_share: float = 0.0,
    m: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """u from comparisons of random pairs, smoothed towards the prior.

    Random pairs are almost all non-matches, but not all: `match_share` (the expected share of
    true matches among them) with their `m` is taken out again. In a small index that share
    (~1e-4 for 10,000 records holding 5,000 matches) is as large as the u of a full address
    or birth date, so without this u would credit the matches' own agreement to chance.
    A level's u never drops below one observation in the sample on that account.
    """
    u: dict[str, list[float]] = {}
    for j, field in enumerate(FIELDS):
        n_levels = len(LEVEL_LABELS[field])
        col = levels[:, j]
        counts = np.array([(col == lv).sum() for lv in range(n_levels)], dtype=float)
        pseudo = np.array(prior["u"][field], dtype=float) * 10.0
        probs = (counts + pseudo) / (counts.sum() + pseudo.sum())
        if match_share > 0 and m is not None:
            floor = np.minimum(probs, 1.0 / max(counts.sum(), 1.0))
            corrected = (probs - match_share * np.array(m[field], dtype=float)) / (1.0 - match_share)
            probs = np.maximum(corrected, floor)
            probs = probs / probs.sum()
        u[field] = [float(p) for p in probs]
    return u


def _posterior(
    levels: np.ndarray, m: dict[str, np.ndarray], u: dict[str, np.ndarray], lam: float
) -> np.ndarray:
    n = levels.shape[0]
    log_m = np.zeros(n)
    log_u = np.zeros(n)
    for j, f in enumerate(FIELDS):
        col = levels[:, j].astype(int)
        present = col >= 0
        idx = np.where(present, col, 0)
        log_m += np.where(present, np.log(m[f][idx]), 0.0)
        log_u += np.where(present, np.log(u[f][idx]), 0.0)
    logit = np.log(lam) + log_m - np.log(1 - lam) - log_u
    posterior: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))
    return posterior


# Pseudo-count pulling m towards the starting values: a field the data never fills (FEBRL
# has no sex or phone) keeps its prior instead of drifting to a uniform, meaningless m.
_M_PSEUDO = 5.0


def estimate_parameters(
    levels: np.ndarray,
    *,
    u: dict[str, list[float]],
    start: dict[str, Any] = DEFAULT_PARAMS,
    iterations: int = 40,
    ignore: tuple[str, ...] = (),
) -> dict[str, Any]:
    """EM for m and lambda over blocked candidate pairs, with u held fixed (as Splink does).

    `levels` is (pairs x FIELDS) with -1 where a value is missing; conditional independence of
    fields given the match status is the Fellegi–Sunter assumption. Fields in `ignore` (those
    the pairs were blocked on, which agree by construction) take no part and keep `start`'s m.
    """
    m = {f: np.array(start["m"][f], dtype=float) for f in FIELDS}
    uu = {f: np.array(u[f], dtype=float) for f in FIELDS}
    lam = 0.1
    n = levels.shape[0]
    if n == 0:
        return {"m": {f: list(map(float, m[f])) for f in FIELDS}, "u": u, "lambda": start["lambda"]}
    levels = levels.copy()
    for f in ignore:
        levels[:, FIELDS.index(f)] = -1
    prior = {f: np.array(start["m"][f], dtype=float) * _M_PSEUDO for f in FIELDS}
    for _ in range(iterations):
        post = _posterior(levels, m, uu, lam)
        lam = float(np.clip(post.mean(), 1e-6, 1 - 1e-6))
        for j, f in enumerate(FIELDS):
            if f in ignore:
                continue
            col = levels[:, j]
            n_levels = len(LEVEL_LABELS[f])
            weights = np.array([post[col == lv].sum() for lv in range(n_levels)]) + prior[f]
            m[f] = weights / weights.sum()
    return {
        "m": {f: [float(x) for x in m[f]] for f in FIELDS},
        "u": {f: [float(x) for x in uu[f]] for f in FIELDS},
        "lambda": lam,
    }


# Training blocking rules, as Splink trains: pairs that share a key of one kind agree on the
# fields that key is made of by construction, so EM over those pairs says nothing about those
# fields' m; each rule estimates the others, and each field's m is averaged over the rules
# that could estimate it. (One EM over all blocked pairs mixes the rules and converges to a
# "match" class full of non-matches that merely share a key.)
TRAINING_RULES: dict[str, tuple[str, ...]] = {
    "d": ("birth_date",),  # same birth date: learns names, address
    "fg": ("family", "given"),  # same names (phonetically): learns birth date, address
    "sb": ("address",),  # same street and town: learns names, birth date
}


def training_rule(key: str) -> str | None:
    rule = key.split(":", 1)[0]
    return rule if rule in TRAINING_RULES else None


def estimate_parameters_by_rule(
    levels_by_rule: dict[str, np.ndarray],
    *,
    u: dict[str, list[float]],
    start: dict[str, Any] = DEFAULT_PARAMS,
    iterations: int = 40,
) -> dict[str, Any]:
    """m per field averaged over the training rules that do not block on it; lambda from one
    E-step of the combined model over all the rules' pairs."""
    estimates: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    for rule, levels in levels_by_rule.items():
        if levels.shape[0] == 0:
            continue
        ignore = TRAINING_RULES[rule]
        est = estimate_parameters(levels, u=u, start=start, iterations=iterations, ignore=ignore)
        for f in FIELDS:
            if f not in ignore:
                estimates[f].append(np.array(est["m"][f]))
    m = {
        f: (np.mean(estimates[f], axis=0) if estimates[f] else np.array(start["m"][f], dtype=float))
        for f in FIELDS
    }
    uu = {f: np.array(u[f], dtype=float) for f in FIELDS}
    everything = [lv for lv in levels_by_rule.values() if lv.shape[0]]
    lam = float(start["lambda"])
    if everything:
        lam = float(np.clip(_posterior(np.concatenate(everything), m, uu, 0.1).mean(), 1e-6, 1 - 1e-6))
    return {
        "m": {f: [float(x) for x in m[f] / m[f].sum()] for f in FIELDS},
        "u": {f: [float(x) for x in uu[f]] for f in FIELDS},
        "lambda": lam,
    }


def fit_parameters(
    *,
    random_levels: np.ndarray,
    levels_by_rule: dict[str, np.ndarray],
    blocked_levels: np.ndarray,
    blocked_pairs: int,
    records: int,
    start: dict[str, Any] = DEFAULT_PARAMS,
) -> dict[str, Any]:
    """The whole training: u from random pairs, m by EM per training rule, then u again with
    the expected true matches among the random pairs taken out, and m once more.

    `blocked_levels` is a sample of the distinct blocked pairs (all rules), `blocked_pairs`
    how many there are: the expected number of true matches in the index is the share of
    that sample the model calls matches, times `blocked_pairs` (blocking finds nearly all).
    """
    u = estimate_u(random_levels, prior=start)
    params = estimate_parameters_by_rule(levels_by_rule, u=u, start=start)
    if blocked_levels.shape[0] == 0 or records < 2:
        return params
    m = {f: np.array(params["m"][f]) for f in FIELDS}
    uu = {f: np.array(u[f]) for f in FIELDS}
    lam = 0.1
    for _ in range(30):  # the share of matches among the blocked pairs, m and u fixed
        lam = float(np.clip(_posterior(blocked_levels, m, uu, lam).mean(), 1e-6, 1 - 1e-6))
    matches = lam * blocked_pairs
    share = min(matches / (records * (records - 1) / 2), 0.5)
    u = estimate_u(random_levels, prior=start, match_share=share, m=params["m"])
    params = estimate_parameters_by_rule(levels_by_rule, u=u, start=start)
    params["expected_matches"] = round(matches, 1)
    return params
