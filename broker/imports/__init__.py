"""Import of an outside study into a facility's archive with that facility's identifiers (IHE
IRWF.b): the import job and per-instance outcome tables, the reconciliation, delivery by C-STORE
or STOW-RS. Exposes `service` (and `routes`, mounted by the app). May import: errors, settings,
db, dicom, security, jobs, facilities, peers, index, identity; federation's remote
retrieve is wired in by `app` (`service.set_fetcher`), the two being of the same layer.
"""
