"""Patient identity (MPI): issuer-qualified identifiers, persons, deterministic and probabilistic
(Fellegi-Sunter) linking with a review queue, merges, the HL7 v2 ADT feed over MLLP.

Owns the identity_* tables (records, their other names, persons, identifiers, blocking keys,
link history, review queue, trusted issuers, model parameters). Never writes another package's
tables: a patient's person is set, and patient rows are locked, through `index.service`
(assign_person, lock_patients, lock_patient_by_identifier).

Exposes `service` (the one door: linking, decisions, merges, PIXm/PDQm queries, the blocking-key
rebuild and `register_jobs()`; the modules behind it are params, records, locks, decisions,
batch, linking, manual, queries, rebuild), `schemas`, `routes.router` (`/api/identity`), `cli`
(`scanonce identity ...`), `mllp` (the listener) and `adt.feed_principal`. Service functions
that act for a caller take its `Principal`.
May import: everything up to index (errors, settings, db, clikit, logfilters, storage, dicom,
security, deps, jobs, facilities, peers, index); never federation, the interfaces or app.
"""
