"""Federation: index sync of facility archives (QIDO-RS or C-FIND; pixels stay home) and retrieve
on demand of a study held only at its facility (WADO-RS or C-GET), as durable jobs.

Owns no tables and writes no SQL; it orchestrates. Sync lists an archive through
`broker.peers.archive`, decides which studies are new or changed since the last sync, and has the
index write them (`index.service`: `upsert_remote_studies`, `mark_seen`, `remove_gone`); retrieve
fetches through `broker.peers`, stores through ingest (`index.service.ingest_files`) and has the
index mark the study local (`mark_local`), or, when instances are missing, keep what arrived with the
study still held at its facility (`mark_partial`). Sync state is written through `facilities.service`.
Exposes `service` (the facade the interfaces call: `sync_facility`, `queue_sync`,
`queue_due_syncs`, `ensure_local`, `is_remote_only`, `remote_only_count`), `register_jobs()`,
`schedule` (the periodic sync), `routes.router` (`POST /api/facilities/{id}/sync`) and `cli`
(`scanonce sync`, `scanonce fetch`).
May import: everything up to identity (errors, settings, db, clikit, storage, dicom, security,
deps, jobs, facilities, peers, index, identity).
"""
