"""Clients of facility archives: the DIMSE SCU (`dimse`: echo, find, move, get, store) and the
DICOMweb/DIMSE sources index sync and retrieve read from (`archive`). Every network failure is
`broker.errors.Unavailable` naming the peer; a failure status is `errors.DimseStatusError`.

Owns no tables. May import: errors, settings, dicom (never facilities: an archive is anything with
the `archive.Archive` attributes).
"""
