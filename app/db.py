"""Database engine and sessions (SQLAlchemy 2): ``Database``, one engine and its session factories, built
explicitly by whoever needs one (the API's runtime, app/runtime.py) and disposed by it.

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

Callers that hold no runtime yet (the Celery tasks, the CLI, tests) use the module functions at the end
(``session_factory(url)``, ``session_scope(url)``, ``dispose_all()``): they go through ``shared``, one explicit
``Databases`` registry, never through the API's runtime.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base for every table (see app/models.py)."""


def private_sqlite_file(url: str) -> None:
    """Create the SQLite file (and its WAL/SHM companions, if present) readable by the owner only: it holds
    API key hashes and every tenant's jobs."""
    from sqlalchemy import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.parent.is_dir() and not path.exists():
        # Only a file that does not exist yet is opened here: closing any descriptor of a database file
        # drops the POSIX locks SQLite holds on it in this process, so another process would take this one's
        # connections for gone, checkpoint and delete the WAL, and they would read a stale snapshot forever.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists() and p.stat().st_mode & 0o077:
            p.chmod(0o600)


DEFAULT_THREADS = 40  # anyio's default thread limit, and HIPP_API_THREADS' default
DEFAULT_POOL_TIMEOUT_S = 2.0  # HIPP_DB_POOL_TIMEOUT_S' default
SQLITE_BUSY_TIMEOUT_S = 10.0


def pool_size_for(threads: int) -> tuple[int, int]:
    """(pool_size, max_overflow) for a process where ``threads`` threads may use the database at once: one
    connection each, plus a few for the process's own threads (the dispatcher, the long-poll watcher)."""
    return threads + 2, 4


def make_engine(url: str, threads: int = DEFAULT_THREADS, pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S) -> Engine:
    """An engine whose pool fits ``threads`` database threads (``pool_size_for``)."""
    size, overflow = pool_size_for(threads)
    pool = {"pool_size": size, "max_overflow": overflow, "pool_timeout": pool_timeout_s}
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


class Database:
    """One engine and its session factories: ``sessions`` (transactional) and ``read_sessions`` (autocommit,
    for single-statement reads: GET routes, API-key checks; one round trip per query, no ROLLBACK at the end).
    Building one does no I/O; the engine connects on first use."""

    def __init__(self, url: str, threads: int = DEFAULT_THREADS, pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S):
        self.url = url
        self.threads = threads
        self.engine = make_engine(url, threads, pool_timeout_s)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.read_sessions: sessionmaker[Session] = sessionmaker(autocommit, expire_on_commit=False)

    @contextmanager
    def scope(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with transaction(self.sessions) as session:
            yield session

    def dispose(self) -> None:
        """Close every pooled connection (the engine reconnects if used again)."""
        self.engine.dispose()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session of ``factory`` that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class Databases:
    """``Database`` objects by URL, built on first use, for code that holds no runtime of its own. Its pools
    are sized by ``configure`` (default: ``DEFAULT_THREADS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_url: dict[str, Database] = {}
        self.threads = DEFAULT_THREADS
        self.pool_timeout_s = DEFAULT_POOL_TIMEOUT_S

    def get(self, url: str) -> Database:
        db = self._by_url.get(url)  # the common path: no lock
        if db is not None:
            return db
        with self._lock:
            if url not in self._by_url:
                self._by_url[url] = Database(url, self.threads, self.pool_timeout_s)
            return self._by_url[url]

    def configure(self, threads: int, timeout_s: float) -> None:
        """Size the pools built from now on; databases already built with other sizes are disposed and
        rebuilt on next use."""
        with self._lock:
            changed = (threads, timeout_s) != (self.threads, self.pool_timeout_s)
            self.threads, self.pool_timeout_s = threads, timeout_s
            if changed:
                for db in self._by_url.values():
                    db.dispose()
                self._by_url.clear()

    def dispose(self) -> None:
        """Close every pooled connection and forget the databases (after fork, or at the end of tests)."""
        with self._lock:
            for db in self._by_url.values():
                db.dispose()
            self._by_url.clear()


shared = Databases()


def _url_or_default(url: str | None) -> str:
    if url is not None:
        return url
    from app.config import get_settings

    return get_settings().resolved_database_url


def get_engine(url: str | None = None) -> Engine:
    """The shared engine for ``url`` (default: the environment's database)."""
    return shared.get(_url_or_default(url)).engine


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return shared.get(_url_or_default(url)).sessions


def read_session_factory(url: str | None = None) -> sessionmaker[Session]:
    """Sessions in autocommit mode, for single-statement reads."""
    return shared.get(_url_or_default(url)).read_sessions


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session on the shared database for ``url`` that commits on success and rolls back on error."""
    with transaction(session_factory(url)) as session:
        yield session


def configure_pool(threads: int, timeout_s: float) -> None:
    """Size the shared databases' pools (``Databases.configure``)."""
    shared.configure(threads, timeout_s)


def dispose_all() -> None:
    """Close every pooled connection of the shared databases (after fork, or at the end of tests)."""
    shared.dispose()
