"""The index: patients, studies, series and instances, and where each study is held. The only
writer of its tables; the one query engine behind QIDO-RS, C-FIND and (soon) FHIR and the lookup.

Exposes `service` (ingest, query, metadata, and the writes other domains need), `schemas`
(Query, StoreOutcome, InstanceRef), `keys` (the object key layout in the store).
May import: errors, settings, db, storage, dicom, security, jobs, facilities, peers. Where it needs
a higher layer (ingest asks identity to link each new patient) it declares a Protocol and the app
factory wires the implementation in.
"""
