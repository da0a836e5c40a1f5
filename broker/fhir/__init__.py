"""The FHIR R4 interface at `/fhir`: IHE PIXm (`Patient/$ihe-pix`), PDQm (`Patient` search),
Patient read and the Patient identity feed (ITI-104 style create and update), over the identity
service. Answers in application/fhir+json, errors as OperationOutcome.

Owns no tables. Exposes `routes.router` (mounted by the app) and `schemas` (issuer <-> FHIR
system, `system|value` tokens, Patient resource <-> identity shapes).
May import every layer below the interfaces (identity and everything under it); never
dicomweb, dimse, app or cli.
"""
