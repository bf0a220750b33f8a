"""Database engine and sessions (SQLAlchemy 2). One engine per process and URL, built on first use.

Postgres in production; SQLite (WAL, busy timeout) for the embedded default. The same models and queries run
on both: claiming uses a conditional UPDATE, which both support.

Pool sizing (both databases): ``pool_size_for(threads)`` connections, where ``threads`` is the number of threads
that may run database code at once (the API's ``HIPP_API_THREADS``); each such thread holds at most one
connection and returns it before it finishes (app/deps.py), so a request never waits for a connection another
request is sitting on. When the pool is exhausted anyway (a stalled database), a checkout gives up after
``HIPP_DB_POOL_TIMEOUT_S`` and the API answers 503 with Retry-After, instead of queueing for 30 s.

SQLite: WAL (readers never block the writer), ``synchronous=NORMAL`` (the WAL recipe: a commit survives a
crash of the process, not a power cut), and write transactions that start with ``BEGIN IMMEDIATE``: a
transaction that reads and then writes takes the write lock up front and waits its turn under the busy
timeout, instead of failing with "database is locked" when another writer committed in between.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base for every table (see app/models.py)."""


_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_read_factories: dict[str, sessionmaker[Session]] = {}


def private_sqlite_file(url: str) -> None:
    """Create the SQLite file (and its WAL/SHM companions, if present) readable by the owner only: it holds
    API key hashes and every tenant's jobs."""
    from sqlalchemy import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.parent.is_dir():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists() and p.stat().st_mode & 0o077:
            p.chmod(0o600)


DEFAULT_THREADS = 40  # anyio's default thread limit, and HIPP_API_THREADS' default
SQLITE_BUSY_TIMEOUT_S = 10.0
_pool_threads = DEFAULT_THREADS
_pool_timeout_s = 2.0


def pool_size_for(threads: int) -> tuple[int, int]:
    """(pool_size, max_overflow) for a process where ``threads`` threads may use the database at once: one
    connection each, plus a few for the process's own threads (the dispatcher, the long-poll watcher)."""
    return threads + 2, 4


def configure_pool(threads: int, timeout_s: float) -> None:
    """Size the pools of engines built from now on (the API calls this with ``HIPP_API_THREADS`` before its
    first request); an engine already built with a smaller pool is rebuilt."""
    global _pool_threads, _pool_timeout_s
    with _lock:
        _pool_threads, _pool_timeout_s = threads, timeout_s
        stale = [url for url, eng in _engines.items() if _pool_capacity(eng) != sum(pool_size_for(threads))]
        for url in stale:
            _engines.pop(url).dispose()
            _factories.pop(url, None)
            _read_factories.pop(url, None)


def _pool_capacity(engine: Engine) -> int:
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", 0)
    return int(size()) + int(overflow) if callable(size) else -1


def make_engine(url: str) -> Engine:
    size, overflow = pool_size_for(_pool_threads)
    pool = {"pool_size": size, "max_overflow": overflow, "pool_timeout": _pool_timeout_s}
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pre-ping: it costs a round trip per checkout, as much as the query of a GET. A connection the
    # server dropped fails one request and invalidates the pool; recycling bounds connection age.
    return create_engine(url, pool_pre_ping=False, pool_recycle=1800, **pool)


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
    factory = _factories.get(url) if url is not None else None  # the per-request path: no lock
    if factory is not None:
        return factory
    engine = get_engine(url)
    with _lock:
        for key, eng in _engines.items():
            if eng is engine:
                return _factories[key]
    raise KeyError("engine not registered")


def read_session_factory(url: str | None = None) -> sessionmaker[Session]:
    """Sessions in autocommit mode, for single-statement reads (GET routes, API-key checks)."""
    factory = _read_factories.get(url) if url is not None else None
    if factory is not None:
        return factory
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
