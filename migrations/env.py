"""Alembic environment. The URL is HIPP_DATABASE_URL (or ``-x url=...``, or the config's sqlalchemy.url).

On Postgres the whole upgrade runs under ``pg_advisory_lock``: the first process migrates, the others wait
and then find nothing to do.
"""

from __future__ import annotations

from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, make_url, pool, text

import app.models  # noqa: F401  (registers the tables)
from app.config import Settings
from app.db import Base

ADVISORY_LOCK_ID = 0x48495050  # "HIPP"

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    return x.get("url") or config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url


def run_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = database_url()
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
        Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
            conn.commit()
        try:
            context.configure(
                connection=conn,
                target_metadata=target_metadata,
                render_as_batch=conn.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                conn.commit()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
