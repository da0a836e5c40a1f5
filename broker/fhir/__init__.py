"""The FHIR R4 interface at `/fhir`: IHE PIXm (`Patient/$ihe-pix`), PDQm (`Patient` search) and the
Patient feed, over the identity service.

Owns no tables. Exposes `routes.router`. May import every layer below the interfaces.
"""
