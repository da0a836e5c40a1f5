"""Patient identity (MPI): issuer-qualified identifiers, persons, deterministic and probabilistic
(Fellegi-Sunter) linking with a review queue, merges, the HL7 v2 ADT feed over MLLP.

Owns the identity_* tables and person links; assigns patients to persons through
`index.service`. Exposes `service` (linking, decisions, queries for PIXm/PDQm), `register_jobs()`,
`routes.router` (`/api/identity`), `cli` (`scanonce identity ...`) and `mllp`.
May import: everything up to index.
"""
