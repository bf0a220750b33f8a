"""Run the Alembic migrations from code (``hipp migrate``, ``hipp serve``, tests).

On Postgres the upgrade holds an advisory lock (migrations/env.py), so concurrent callers never race.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if url.startswith("sqlite"):
        from app.db import private_sqlite_file

        private_sqlite_file(url)  # before Alembic's engine creates the file with the default mode
    command.upgrade(alembic_config(url), revision)
