"""Database engine and sessions (SQLAlchemy 2). One engine per process and URL, built on first use.

Postgres in production; SQLite (WAL, busy timeout) for the embedded default. The same models and queries run
on both: claiming uses a conditional UPDATE, which both support.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base for every table (see app/models.py)."""


_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_read_factories: dict[str, sessionmaker[Session]] = {}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # No pre-ping: it costs a round trip per checkout, as much as the query of a GET. A connection the
    # server dropped fails one request and invalidates the pool; recycling bounds connection age.
    return create_engine(url, pool_pre_ping=False, pool_recycle=1800, pool_size=10, max_overflow=20)


def get_engine(url: str | None = None) -> Engine:
    if url is None:
        from app.config import get_settings

        url = get_settings().resolved_database_url
    with _lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
            _factories[url] = sessionmaker(_engines[url], expire_on_commit=False)
            # Reads that need no transaction: one round trip per query, no ROLLBACK when the session ends.
            autocommit = _engines[url].execution_options(isolation_level="AUTOCOMMIT")
            _read_factories[url] = sessionmaker(autocommit, expire_on_commit=False)
        return _engines[url]


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    engine = get_engine(url)
    with _lock:
        for key, eng in _engines.items():
            if eng is engine:
                return _factories[key]
    raise KeyError("engine not registered")


def read_session_factory(url: str | None = None) -> sessionmaker[Session]:
    """Sessions in autocommit mode, for single-statement reads (GET routes, API-key checks)."""
    engine = get_engine(url)
    with _lock:
        for key, eng in _engines.items():
            if eng is engine:
                return _read_factories[key]
    raise KeyError("engine not registered")


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_all() -> None:
    """Close every pooled connection (after fork, or at the end of tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()
        _read_factories.clear()
