"""The index: patients, studies, series and instances, and where each study is held
(`study_location`). The only writer of its tables; the one query engine behind QIDO-RS, C-FIND
and (soon) FHIR and the lookup.

Two writers share one row mapping (`ingest.study_columns`, `series_columns`, `patient_columns`,
`level_json`) and one patient-issuer rule (`ingest.patient_key`): `ingest`, for the instances the
broker stores, and `remote`, for studies held at facility archives, written on federation's
behalf from an archive's listing (federation decides what changed; the SQL is here). A patient
row's address and telephone (`ingest.contact_columns`) are ingest's alone: what it last gave the
identity linker, so a new study that says otherwise relinks the patient.
Exposes `service` (ingest, query, metadata, and the writes and reads other domains need: for
federation `upsert_remote_studies`, `mark_seen`, `remove_gone`, `mark_local`, `mark_partial`,
`study_locations`, `held_instances`, `remote_holders`, `is_remote_only`, `remote_only_count`),
`schemas` (Query, StoreOutcome, InstanceRef), `keys` (the object key layout in the store), `verify`
(the integrity check of index against object store: `scanonce verify` in `cli`, `POST /api/verify`
in `routes`, job kind "verify").
May import: metrics, errors, settings, db, storage, dicom, security, jobs, facilities, peers. Where it needs
a higher layer (ingest and sync ask identity to link each new patient) it declares a Protocol
and the app factory wires the implementation in.
"""
