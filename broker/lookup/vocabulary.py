"""The versioned data files of the relevance engine, loaded and checked once, and the reading of
exam text against them.

data/regions.toml    the region tree (CID 4031 codes, BodyPartExamined terms) and compound macros
data/vocabulary.toml words and abbreviations of exam text
data/codes.toml      CPT, LOINC and RadLex Playbook codes, each with its source
data/rules.toml      modality families, implied coverage, edges, neighbours, usability, windows

Nothing here branches on a particular region or word: that is the data's job.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from broker.lookup.schemas import Windows

DATA_DIR = Path(__file__).resolve().parent / "data"
MAX_TERM_TOKENS = 5
_TOKEN = re.compile(r"[A-Z0-9]+")
LATERALITIES = ("L", "R", "B")
CONTRASTS = ("with", "without", "with_and_without")


class DataFileError(ValueError):
    """A data file contradicts itself (unknown region, cycle, bad value): a packaging defect."""


@dataclass(frozen=True)
class Region:
    id: str
    parent: str | None
    code: tuple[str, str, str]
    cid: int
    body_part: tuple[str, ...]
    paired: bool
    own_purpose: str | None
    lies_in: str | None


@dataclass(frozen=True)
class Macro:
    id: str
    regions: tuple[str, ...]
    code: tuple[str, str, str]
    body_part: tuple[str, ...]


@dataclass(frozen=True)
class Term:
    text: str
    regions: tuple[str, ...] = ()
    fallback_regions: tuple[str, ...] = ()
    ct_regions: tuple[str, ...] | None = None
    ct_fallback_regions: tuple[str, ...] = ()
    refines: tuple[tuple[str, str], ...] = ()
    modality: str | None = None
    weak_modality: str | None = None
    laterality: str | None = None
    contrast: str | None = None
    weak_contrast: str | None = None
    purpose: str | None = None
    abbreviation: bool = False


@dataclass(frozen=True)
class CodeEntry:
    system: str
    code: str
    label: str
    modality: str | None
    regions: tuple[str, ...]
    contrast: str | None
    laterality: str | None
    purpose: str | None
    guidance: bool
    source: str


@dataclass(frozen=True)
class Implied:
    region: str
    adds: tuple[str, ...]
    modalities: frozenset[str]
    laterality: str | None


@dataclass(frozen=True)
class Edge:
    region: str
    shows: frozenset[str]
    note: str


@dataclass
class TextReading:
    """What one piece of exam text says, before the interpretation weighs it against codes and
    DICOM attributes."""

    regions: list[str] = field(default_factory=list)
    fallback_regions: list[str] = field(default_factory=list)
    ct_fallback_regions: list[str] = field(default_factory=list)
    ct_only_regions: list[str] = field(default_factory=list)
    non_ct_regions: list[str] = field(default_factory=list)
    modality: str | None = None
    weak_modality: str | None = None
    lateralities: set[str] = field(default_factory=set)
    contrast: str | None = None
    weak_contrast: str | None = None
    purposes: set[str] = field(default_factory=set)
    refines: dict[str, str] = field(default_factory=dict)
    terms: list[str] = field(default_factory=list)

    @property
    def recognised(self) -> bool:
        return bool(self.terms)

    def regions_for(self, modality: str | None) -> list[str]:
        """Named regions given the exam's final modality (CT KUB vs plain KUB), refined by
        qualifiers ("VENOUS DOPPLER LLE" is the veins of the left leg)."""
        ct = modality == "CT"
        named = [*self.regions, *(self.ct_only_regions if ct else self.non_ct_regions)]
        return _dedupe(self.refines.get(r, r) for r in named)

    def fallbacks_for(self, modality: str | None) -> list[str]:
        ct = modality == "CT"
        return _dedupe([*self.fallback_regions, *(self.ct_fallback_regions if ct else [])])

    @property
    def laterality(self) -> str | None:
        sides = self.lateralities
        if not sides:
            return None
        if "B" in sides or {"L", "R"} <= sides:
            return "B"
        return next(iter(sides))


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def normalise_body_part(value: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", value.upper())


class Vocabulary:
    """The four data files, cross-checked. Built once per process (`load()`)."""

    def __init__(self, data_dir: Path = DATA_DIR) -> None:
        raw = {name: _read(data_dir / f"{name}.toml") for name in ("regions", "vocabulary", "codes", "rules")}
        self.versions: dict[str, str] = {name: str(doc["version"]) for name, doc in raw.items()}
        self.regions: dict[str, Region] = {}
        for rid, spec in raw["regions"]["regions"].items():
            self.regions[rid] = Region(
                id=rid,
                parent=spec.get("parent"),
                code=_code(spec["code"], rid),
                cid=int(spec["cid"]),
                body_part=tuple(normalise_body_part(b) for b in spec.get("body_part", [])),
                paired=bool(spec.get("paired", False)),
                own_purpose=spec.get("own_purpose"),
                lies_in=spec.get("lies_in"),
            )
        self.macros: dict[str, Macro] = {
            mid: Macro(
                id=mid,
                regions=_tuple(spec["regions"]),
                code=_code(spec["code"], mid),
                body_part=tuple(normalise_body_part(b) for b in spec.get("body_part", [])),
            )
            for mid, spec in raw["regions"].get("macros", {}).items()
        }
        self._check_tree()

        vocab = raw["vocabulary"]
        self.rewrites = [(re.compile(pattern), to) for pattern, to in vocab.get("rewrite", [])]
        self.terms: dict[tuple[str, ...], Term] = {}
        for text, spec in vocab["terms"].items():
            term = self._term(text, spec)
            key = tuple(_TOKEN.findall(text.upper()))
            if not key or len(key) > MAX_TERM_TOKENS:
                raise DataFileError(f"vocabulary term {text!r} must have 1-{MAX_TERM_TOKENS} tokens")
            self.terms[key] = term

        rules = raw["rules"]
        mods = dict(rules["modalities"])
        self.modality_order: tuple[str, ...] = _tuple(mods.pop("order"))
        self.modality_families: dict[str, str] = {k.upper(): str(v) for k, v in mods.items()}
        for family in self.modality_families.values():
            if family not in self.modality_order:
                raise DataFileError(f"modality family {family} missing from modalities.order")
        self.implied = [
            Implied(
                region=self._known(spec["region"], "implied"),
                adds=tuple(self._known(r, "implied") for r in spec["adds"]),
                modalities=frozenset(spec["modalities"]),
                laterality=spec.get("laterality"),
            )
            for spec in rules.get("implied", [])
        ]
        for spec in rules.get("edge", []):
            if set(spec) - {"region", "shows", "note"}:
                raise DataFileError(f"edge {spec.get('region')}: unknown keys {sorted(set(spec))}")
        self.collapse: dict[str, frozenset[str] | None] = {
            self._known(spec["region"], "collapse"): (
                frozenset(spec["modalities"]) if "modalities" in spec else None
            )
            for spec in rules.get("collapse", [])
        }
        self.edges = [
            Edge(
                region=self._known(spec["region"], "edge"),
                shows=frozenset(self._known(r, "edge") for r in spec["shows"]),
                note=str(spec["note"]),
            )
            for spec in rules.get("edge", [])
        ]
        self.neighbours = {
            frozenset((self._known(a, "neighbours"), self._known(b, "neighbours")))
            for a, b in rules["neighbours"]["pairs"]
        }
        self.rule_ids = {
            "guidance": str(rules["guidance"]["rule"]),
            "dxa": str(rules["dxa"]["rule"]),
        }
        usability = rules["usability"]
        self.thin_slice_max_mm = float(usability["thin_slice_max_mm"])
        self.thin_words = tuple(str(w).upper() for w in usability["thin_words"])
        self.phase_words: dict[str, tuple[str, ...]] = {
            phase: tuple(str(w).upper() for w in words) for phase, words in usability["phases"].items()
        }
        self.window_days: dict[str, int] = {k: int(v["days"]) for k, v in rules["windows"].items()}
        self.window_sources: dict[str, str] = {k: str(v["source"]) for k, v in rules["windows"].items()}

        codes = raw["codes"]
        self.code_sources: dict[str, str] = dict(codes["sources"])
        self.codes: dict[str, dict[str, CodeEntry]] = {}
        for system in ("cpt", "loinc", "radlex"):
            table: dict[str, CodeEntry] = {}
            for code, spec in codes.get(system, {}).items():
                if spec["source"] not in self.code_sources:
                    raise DataFileError(f"{system} {code}: unknown source {spec['source']!r}")
                for r in spec.get("regions", []):
                    self._known(r, f"{system} {code}")
                table[code.upper()] = CodeEntry(
                    system=system,
                    code=code,
                    label=str(spec["label"]),
                    modality=spec.get("modality"),
                    regions=_tuple(spec.get("regions")),
                    contrast=_check_choice(spec.get("contrast"), CONTRASTS, f"{system} {code}"),
                    laterality=_check_choice(spec.get("laterality"), LATERALITIES, f"{system} {code}"),
                    purpose=spec.get("purpose"),
                    guidance=bool(spec.get("guidance", False)),
                    source=str(spec["source"]),
                )
            self.codes[system] = table

        self.body_parts: dict[str, tuple[str, ...]] = {}
        for region in self.regions.values():
            for bp in region.body_part:
                self._add_body_part(bp, (region.id,))
        for macro in self.macros.values():
            for bp in macro.body_part:
                self._add_body_part(bp, macro.regions)

    # -- construction helpers -----------------------------------------------------------------

    def _add_body_part(self, bp: str, regions: tuple[str, ...]) -> None:
        if bp in self.body_parts and self.body_parts[bp] != regions:
            raise DataFileError(f"BodyPartExamined {bp} given to two regions")
        self.body_parts[bp] = regions

    def _known(self, name: str, where: str) -> str:
        if name not in self.regions and name not in self.macros:
            raise DataFileError(f"{where}: unknown region {name!r}")
        return name

    def _check_tree(self) -> None:
        for region in self.regions.values():
            if region.parent is not None and region.parent not in self.regions:
                raise DataFileError(f"region {region.id}: unknown parent {region.parent!r}")
            if region.lies_in is not None:
                self._known(region.lies_in, region.id)
            seen = {region.id}
            parent = region.parent
            while parent is not None:
                if parent in seen:
                    raise DataFileError(f"region {region.id}: cycle through {parent}")
                seen.add(parent)
                parent = self.regions[parent].parent
        for macro in self.macros.values():
            if macro.id in self.regions:
                raise DataFileError(f"macro {macro.id} shadows a region")
            for r in macro.regions:
                if r not in self.regions:
                    raise DataFileError(f"macro {macro.id}: unknown region {r!r}")

    def _term(self, text: str, spec: Mapping[str, Any]) -> Term:
        where = f"vocabulary term {text!r}"
        for key in ("regions", "fallback_regions", "ct_fallback_regions"):
            for r in spec.get(key, []):
                self._known(r, where)
        ct_regions = spec.get("ct_regions")
        for r in ct_regions or []:
            self._known(r, where)
        for a, b in spec.get("refines", {}).items():
            self._known(a, where)
            self._known(b, where)
        for key in ("modality", "weak_modality"):
            if key in spec and spec[key] not in self.modality_order_all:
                raise DataFileError(f"{where}: unknown modality {spec[key]!r}")
        return Term(
            text=text,
            regions=_tuple(spec.get("regions")),
            fallback_regions=_tuple(spec.get("fallback_regions")),
            ct_regions=None if ct_regions is None else _tuple(ct_regions),
            ct_fallback_regions=_tuple(spec.get("ct_fallback_regions")),
            refines=tuple((str(a), str(b)) for a, b in spec.get("refines", {}).items()),
            modality=spec.get("modality"),
            weak_modality=spec.get("weak_modality"),
            laterality=_check_choice(spec.get("laterality"), LATERALITIES, where),
            contrast=_check_choice(spec.get("contrast"), CONTRASTS, where),
            weak_contrast=_check_choice(spec.get("weak_contrast"), CONTRASTS, where),
            purpose=spec.get("purpose"),
            abbreviation=bool(spec.get("abbreviation", False)),
        )

    modality_order_all = ("CT", "MR", "US", "XR", "MG", "NM", "PT", "RF", "XA", "DXA")

    # -- the region tree ------------------------------------------------------------------------

    def expand(self, names: Iterable[str]) -> list[str]:
        """Regions of a list of regions and macros, macros expanded, order kept."""
        out: list[str] = []
        for name in names:
            out.extend(self.macros[name].regions if name in self.macros else (name,))
        return _dedupe(out)

    def collapse_parts(self, regions: list[str], modality: str | None) -> tuple[list[str], list[str]]:
        """Drop a collapsible region when the same text names a part of it: (kept, dropped)."""
        dropped = []
        for r in regions:
            modalities = self.collapse.get(r, frozenset())
            if r not in self.collapse or (modalities is not None and modality not in modalities):
                continue
            if any(o != r and r in self.ancestors(o) for o in regions):
                dropped.append(r)
        return [r for r in regions if r not in dropped], dropped

    def ancestors(self, region: str) -> list[str]:
        """The region itself first, then its parent, up to the top region."""
        chain = [region]
        parent = self.regions[region].parent
        while parent is not None:
            chain.append(parent)
            parent = self.regions[parent].parent
        return chain

    def relation(self, planned: str, prior: str) -> str | None:
        """equal, prior_contains (prior is an ancestor), planned_contains, or None."""
        if planned == prior:
            return "equal"
        if prior in self.ancestors(planned):
            return "prior_contains"
        if planned in self.ancestors(prior):
            return "planned_contains"
        return None

    def is_paired(self, region: str) -> bool:
        return any(self.regions[r].paired for r in self.ancestors(region))

    def top(self, region: str) -> str:
        return self.ancestors(region)[-1]

    def own_purpose(self, region: str) -> str | None:
        for r in self.ancestors(region):
            if self.regions[r].own_purpose:
                return self.regions[r].own_purpose
        return None

    def label(self, region: str) -> str:
        if region in self.regions:
            return self.regions[region].code[2]
        return self.macros[region].code[2]

    # -- reading text ---------------------------------------------------------------------------

    def tokens(self, text: str) -> list[str]:
        upper = f" {text.upper()} "
        for pattern, to in self.rewrites:
            upper = pattern.sub(to, upper)
        return _TOKEN.findall(upper)

    def read(self, text: str | None) -> TextReading:
        reading = TextReading()
        if not text:
            return reading
        tokens = self.tokens(text)
        i = 0
        while i < len(tokens):
            for n in range(min(MAX_TERM_TOKENS, len(tokens) - i), 0, -1):
                term = self.terms.get(tuple(tokens[i : i + n]))
                if term is not None:
                    self._apply(term, reading)
                    i += n
                    break
            else:
                i += 1
        return reading

    def _apply(self, term: Term, reading: TextReading) -> None:
        described = term.text
        if term.abbreviation:
            parts = [p for p in (term.modality or term.weak_modality,) if p]
            parts += self.expand(term.regions or term.fallback_regions)
            described = f"{term.text} = {' + '.join(parts)}" if parts else term.text
        reading.terms.append(described)
        if term.ct_regions is None:
            reading.regions.extend(term.regions)
        else:
            reading.ct_only_regions.extend(term.ct_regions)
            reading.non_ct_regions.extend(term.regions)
        reading.fallback_regions.extend(term.fallback_regions)
        reading.ct_fallback_regions.extend(term.ct_fallback_regions)
        reading.refines.update(term.refines)
        if term.modality and reading.modality is None:
            reading.modality = term.modality
        if term.weak_modality and reading.weak_modality is None:
            reading.weak_modality = term.weak_modality
        if term.laterality:
            reading.lateralities.add(term.laterality)
        if term.contrast and reading.contrast is None:
            reading.contrast = term.contrast
        if term.weak_contrast and reading.weak_contrast is None:
            reading.weak_contrast = term.weak_contrast
        if term.purpose:
            reading.purposes.add(term.purpose)

    # -- codes and body parts -------------------------------------------------------------------

    def code(self, value: str, scheme: str | None = None) -> tuple[str | None, CodeEntry | None]:
        """(system, entry) of a procedure code; system None when it cannot be told."""
        system = code_system(value, scheme)
        key = value.strip().upper()
        if system == "radlex" and not key.startswith("RPID"):
            key = f"RPID{key}"
        if system is None:
            return None, None
        return system, self.codes[system].get(key)

    def body_part(self, value: str | None) -> list[str]:
        if not value:
            return []
        norm = normalise_body_part(value)
        if norm in self.body_parts:
            return list(self.body_parts[norm])
        reading = self.read(value.replace("_", " "))
        return self.expand(reading.regions_for(None) or reading.fallbacks_for(None))

    def modality_family(self, dicom_modality: str) -> str | None:
        return self.modality_families.get(dicom_modality.strip().upper())

    def default_windows(self) -> Windows:
        return Windows(**self.window_days)


_SCHEMES = {
    "C4": "cpt",
    "C5": "cpt",
    "CPT": "cpt",
    "CPT4": "cpt",
    "LN": "loinc",
    "LNC": "loinc",
    "LOINC": "loinc",
    "RADLEX": "radlex",
    "RPID": "radlex",
    "PLAYBOOK": "radlex",
}


def code_system(value: str, scheme: str | None = None) -> str | None:
    """cpt, loinc or radlex, from the DICOM CodingSchemeDesignator or else the code's shape."""
    if scheme:
        system = _SCHEMES.get(scheme.strip().upper())
        if system:
            return system
    v = value.strip().upper()
    if re.fullmatch(r"RPID\d+", v):
        return "radlex"
    if re.fullmatch(r"\d{1,7}-\d", v):
        return "loinc"
    if re.fullmatch(r"\d{4}[0-9A-Z]", v):
        return "cpt"
    return None


def _code(value: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(value, list) or len(value) != 3:
        raise DataFileError(f"{where}: code must be [scheme, value, meaning]")
    return str(value[0]), str(value[1]), str(value[2])


def _check_choice(value: Any, allowed: tuple[str, ...], where: str) -> str | None:
    if value is None:
        return None
    if value not in allowed:
        raise DataFileError(f"{where}: {value!r} not one of {allowed}")
    return str(value)


def _read(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        doc = tomllib.load(fh)
    if "version" not in doc:
        raise DataFileError(f"{path.name} has no version")
    return doc


@lru_cache(maxsize=1)
def load() -> Vocabulary:
    return Vocabulary()


def default_windows() -> Windows:
    return load().default_windows()
