"""The FHIR R4 interface at `/fhir`: IHE PIXm (`Patient/$ihe-pix`), PDQm (`Patient` search),
Patient read and the Patient identity feed (ITI-104 style create and update), over the identity
service; ImagingStudy search and read (`service`: a person's studies from the lookup's
`confirmed_patients`, matched by the index's one query engine). Answers in application/fhir+json,
errors as OperationOutcome.

Owns no tables. Exposes `routes.router` (mounted by the app), `schemas` (issuer <-> FHIR
system, `system|value` tokens, Patient resource <-> identity shapes) and `service`.
May import every layer below the interfaces (lookup, identity and everything under them); never
dicomweb, dimse, cds, web, app or cli.
"""
