"""What a browser opens on the broker: the clinician's lookup page and the patient's imaging
record (`/`, `/record`), the admin pages (`/admin/...`: facilities, jobs, identity review), the API
docs and the OHIF Viewer.

Exposes the routers (`routes`) and `scanonce web install` (`cli`). Pages show what the services
answer (lookup, identity, facilities, jobs, federation): templates in `templates/`, view data in
`pages` and `present`, pinned browser assets in `assets`. May import every layer below the
interfaces (docs/architecture.md); nothing imports it but the app and the CLI.
"""
