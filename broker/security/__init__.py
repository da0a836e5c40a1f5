"""Who is calling: the `Principal` (who, role, facility) every route and DIMSE handler receives,
and how it is established: bearer tokens (tokens.py), the one policy table (policy.py), the guard
middleware that enforces it on every HTTP request (http.py), the pages' sign-in (oidc.py, routes.py).

May import: errors, settings, db.
"""
