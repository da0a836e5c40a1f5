"""The DICOMweb interface (PS3.18): STOW-RS, QIDO-RS and WADO-RS at `/dicom-web` and per facility
at `/facilities/{facility}/dicom-web`.

Owns no tables: parses requests, calls `index` (store, query, metadata), `facilities` (the
partition) and `federation` (retrieve on demand), and shapes responses (multipart streaming).
Exposes `routes.router` and `routes.facility_router`. May import every layer below the interfaces.
"""
