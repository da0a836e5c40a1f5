"""DICOM know-how every domain shares: the JSON model (PS3.18 F), attribute levels and keywords,
UIDs, status codes, pixel data decoding and rendering, and the pynetdicom set-up shared by the
SCP and the SCU (`reactor`: event-driven association loops; `network`: the spooling AE).

Exposes plain functions and values; no tables, no HTTP. May import: `broker.errors` only.
Importing it turns pydicom's value checks off (below: they quote patient data into logs).
"""

from pydicom import config as _pydicom_config

# pydicom's value checks report an invalid value by quoting it, in a log record and a warning
# ("Invalid value for VR DA: '19xx0101'"): an outside patient's birth date, age or ID in the
# server's log. The broker checks what it relies on itself (UIDs, dates and times it matches,
# lengths: dicom.uids, dicom.bounds, index.query) and keeps the rest as it was sent, so
# pydicom's checks are off for reading and writing, in every process that handles DICOM.
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
_pydicom_config.settings.writing_validation_mode = _pydicom_config.IGNORE
