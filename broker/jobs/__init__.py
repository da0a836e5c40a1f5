"""Durable jobs in the database (claimed with SKIP LOCKED on PostgreSQL), their worker (a thread of
`scanonce serve`, or `scanonce worker` processes) and `/api/jobs`.

Owns the job table. Each domain registers its job kinds explicitly (`register_jobs()`, called by
the app factory). May import: errors, settings, db, clikit, deps.
"""
