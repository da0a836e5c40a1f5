"""The facility registry: facilities, the issuer that qualifies each one's Patient IDs, the AE
titles they call from, where their archive answers (DICOMweb, DIMSE), their sharing policy, and
how their last index sync went.

Owns the tables facility, facility_ae and sync_state. Exposes `service` (keyword-only functions),
`routes.router` (`/api/facilities`) and `cli` (`scanonce facility ...`).
May import: errors, settings, db, clikit, dicom, security, deps (never index or anything above).
"""
