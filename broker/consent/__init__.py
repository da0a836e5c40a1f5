"""Patients' sharing choices (consent) and emergency reads (break-the-glass).

Owns the `consent` and `break_glass` tables. Exposes (service.py) the one question every
interface that crosses facilities asks: `may_share` for one record, `visibility` as an SQL
condition the index's query engine applies to every study row, `study_visible` for a retrieve by
UID, and recording/revoking choices and break-the-glass grants. Choices are kept against the
patient record they were given for and resolved through that record's current person (identity),
so an opt-out follows the person across facilities and survives re-linking.

May import: errors, settings, db, security, facilities, index, identity.
"""
