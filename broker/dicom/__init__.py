"""DICOM know-how every domain shares: the JSON model (PS3.18 F), attribute levels and keywords,
UIDs, status codes, pixel data decoding and rendering, and the pynetdicom set-up shared by the
SCP and the SCU (`reactor`: event-driven association loops; `network`: the spooling AE).

Exposes plain functions and values; no tables, no HTTP. May import: `broker.errors` only.
"""
