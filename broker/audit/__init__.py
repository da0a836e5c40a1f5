"""The audit trail: every access to patient data as an event shaped like FHIR AuditEvent (IHE
BALP), in an append-only table whose rows form a SHA-256 hash chain (`scanonce audit verify`).

Owns the tables `audit_event` and `audit_chain_head`. Exposes `service` (append, the group-commit
writer, verify, search), `http.AuditMiddleware` (records HTTP accesses), the routes
(`/fhir/AuditEvent`, `/api/audit`) and the CLI. Where another domain must record in its own
transaction (ingest), it takes a hook built here (`service.ingest_hook`), so that domain never
imports this one.

May import: errors, settings, db, dicom, security, deps.
"""
