from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - CLI use: `alembic -x url=...`
    from broker.db import make_engine

    url = context.get_x_argument(as_dictionary=True)["url"]
    connection = make_engine(url).connect()

context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
