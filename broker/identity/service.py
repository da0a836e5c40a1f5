"""Patient identity: linking (issuer, Patient ID) records to persons (MPI)."""

from __future__ import annotations

from sqlmodel import Session

from broker.index.models import Patient


def link_patient(*, session: Session, patient: Patient) -> None:
    """Called by ingest after a patient row is created or its demographics change.

    Placeholder until the identity domain lands: leaves `patient.person_id` unset.
    """
    return None
