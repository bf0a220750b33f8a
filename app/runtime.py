"""The service runtime: what a process builds once from its settings and shares between requests, in one
object that is built and disposed explicitly.

- ``settings``: read once (app/config.py);
- ``db``: the database engine and its session factories (app/db.py), its pool sized for ``threads``;
- ``broker``: the publishing Celery client, and ``dispatcher``, the thread that publishes submitted jobs
  (app/queue.py), started on first use;
- ``storage``: the artifact store (app/storage.py), opened on first use (an S3 store that is down at start-up
  does not stop the API from starting; ``/readyz`` reports it);
- ``keys``: the verified API-key cache (app/security.py); ``limits``: the per-tenant rate-limit buckets
  (app/ratelimit.py); ``tenant_locks``: per-tenant submission locks (app/services/jobs.py).

The API builds one in the lifespan of ``app.main.create_app`` and keeps it on ``app.state.runtime``; routes
get its parts through the dependencies of app/deps.py. Code that runs outside FastAPI builds its own with
``Runtime(settings)`` and closes it (``with Runtime(settings) as rt: ...``). Nothing in ``app`` keeps a
runtime in a module global.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING

from app.config import Settings
from app.db import DEFAULT_THREADS, Database
from app.queue import Dispatcher, make_celery_client
from app.ratelimit import TokenBuckets
from app.security import KeyCache
from app.services.jobs import TenantLocks
from app.storage import Storage, open_storage

if TYPE_CHECKING:
    from celery import Celery


class Runtime:
    def __init__(self, settings: Settings, threads: int = DEFAULT_THREADS) -> None:
        """``threads``: how many threads may use the database at once (the API passes ``HIPP_API_THREADS``);
        the pool has one connection for each (app/db.py). Building does no I/O."""
        self.settings = settings
        self.db = Database(settings.resolved_database_url, threads, settings.db_pool_timeout_s)
        self.broker: Celery = make_celery_client(settings)
        self.keys = KeyCache()
        self.limits = TokenBuckets()
        self.tenant_locks = TenantLocks()
        self._lock = threading.Lock()
        self._storage: Storage | None = None
        self._dispatcher: Dispatcher | None = None

    @classmethod
    def for_api(cls, settings: Settings) -> Runtime:
        """The API's runtime: a database pool for its ``HIPP_API_THREADS`` route threads."""
        return cls(settings, threads=settings.api_threads)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            with self._lock:
                if self._storage is None:
                    self._storage = open_storage(self.settings)
        return self._storage

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = Dispatcher(self.settings, self.db.sessions, self.broker)
        return self._dispatcher

    def close(self) -> None:
        """Publish what the dispatcher holds, stop it, close the broker's and the database's connections."""
        with self._lock:
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.close()
        self.broker.close()
        self.db.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
