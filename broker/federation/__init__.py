"""Federation: index sync of facility archives (QIDO-RS or C-FIND; pixels stay home) and retrieve
on demand of a study held only at its facility (WADO-RS or C-GET), as durable jobs.

Owns no tables of its own: it writes the index through `index.service`, and sync state through
`facilities.service`. Exposes `service` (the facade the interfaces call), `register_jobs()`,
`schedule` (the periodic sync), `routes.router` (`POST /api/facilities/{id}/sync`) and `cli`
(`scanonce sync`, `scanonce fetch`).
May import: everything up to identity; the archive clients come from `broker.peers`.
"""
