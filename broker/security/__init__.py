"""Who is calling: the `Principal` (who, role, facility) every route and DIMSE handler receives,
and how it is established. Enforcement, consent and audit will live here.

May import: errors, settings, db.
"""
