"""What one instance contributes to the prior lookup's facts, read at parse time.

Kept apart from `broker.index.facts` (the tables and the facts job) on purpose: the STOW-RS parse
workers import this module, and a worker that imported SQLAlchemy, Alembic and the job runner
for it would hold ~50 MB more of the node's memory for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from broker.dicom.dose import DoseRecord, DoseSource, read_dose
from broker.dicom.json_model import str_value

_SLICE_THICKNESS = "00180050"
_CONTRAST_AGENT = "00180010"
_LATERALITY = "00200060"
_IMAGE_LATERALITY = "00200062"
_BODY_PART = "00180015"


@dataclass(frozen=True)
class InstanceFacts:
    """What one instance contributes to its series' facts and its study's dose (small: parse
    workers send it back with the parsed instance)."""

    slice_thickness_mm: float | None = None
    contrast_agent: str = ""
    laterality: str = ""
    body_part: str = ""
    dose_json: str | None = None


def instance_facts(attrs: Mapping[str, Any]) -> InstanceFacts:
    """Read once per instance, from the DICOM JSON the index builds at ingest. Never raises:
    facts that cannot be read are left unknown, and the instance is stored all the same."""
    try:
        return _read_facts(attrs)
    except Exception:  # noqa: BLE001 - odd values must never fail an ingest
        return InstanceFacts()


def _read_facts(attrs: Mapping[str, Any]) -> InstanceFacts:
    thickness: float | None
    try:
        thickness = float(str_value(dict(attrs), _SLICE_THICKNESS) or "nan")
        if thickness != thickness or thickness <= 0:
            thickness = None
    except ValueError:
        thickness = None
    a = dict(attrs)
    record = read_dose(a).record
    return InstanceFacts(
        slice_thickness_mm=thickness,
        contrast_agent=str_value(a, _CONTRAST_AGENT).strip()[:64],
        laterality=(str_value(a, _LATERALITY) or str_value(a, _IMAGE_LATERALITY)).strip()[:16],
        body_part=str_value(a, _BODY_PART).strip()[:64],
        dose_json=None if record is None else compact_dose_json(record),
    )


def compact_dose_json(record: DoseRecord) -> str:
    """The record as JSON without what study_dose never reads (empty fields, problems) and
    without the UIDs its row already holds: the SOP Instance UID is the row's key and the Study
    Instance UID its study's (`broker.index.facts.dose_record` puts both back). Each was ~90
    bytes of a ~400-byte row per CT image. An image DAP record keeps its SOP Instance UID: the
    previous release's lookup falls back to it as the event key and reads the JSON as it is, and
    it serves during a rolling upgrade (its lookup is given the study's UID, so that one is never
    missed)."""
    data = record.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["source"] = record.source.value
    data.pop("problems", None)
    data.pop("study_instance_uid", None)
    if record.source != DoseSource.IMAGE_DAP:
        data.pop("sop_instance_uid", None)
    return orjson.dumps(data).decode()
