"""Long-polling ``GET /jobs/{id}?wait=S``: one watcher per API process reads every watched job in one query
per tick and wakes the requests whose job changed, so a thousand waiting clients cost one query every
``TICK_S``, and no waiting request holds a thread or a database connection.

A job *changes* when what a waiting user sees changes: status, stage, stage progress, progress or attempt
(a heartbeat alone is not a change). ``etag`` names that state; it is the ``ETag`` of ``GET /jobs/{id}``.

Shutdown: on SIGTERM/SIGINT the watcher drains: every waiting request is answered at once with the job as it
is, and later ones do not wait, so the server stops in seconds, not after the longest wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job

log = logging.getLogger("hipp.api")
TICK_S = 0.5
VERSION_COLUMNS = (Job.status, Job.stage, Job.stage_progress, Job.progress, Job.attempt)


def etag(status: str, stage: str | None, stage_progress: float, progress: float, attempt: int) -> str:
    raw = f"{status}|{stage}|{stage_progress:.4f}|{progress:.4f}|{attempt}"
    return 'W/"' + hashlib.sha256(raw.encode()).hexdigest()[:20] + '"'


def job_etag(job: Job) -> str:
    return etag(job.status, job.stage, job.stage_progress, job.progress, job.attempt)


def matches(if_none_match: str | None, tag: str) -> bool:
    """Weak comparison of an ``If-None-Match`` header against ``tag``."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or tag.removeprefix("W/") in tags


class JobWatcher:
    """The API's long-poll watcher (one per app, on ``app.state.watcher``); reads jobs with ``read_sessions``
    (the runtime's autocommit sessions)."""

    def __init__(self, read_sessions: sessionmaker[Session], tick_s: float = TICK_S) -> None:
        self.read_sessions = read_sessions
        self.tick_s = tick_s
        self.draining = False
        self._waiters: dict[uuid.UUID, list[tuple[str, asyncio.Event]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, job_id: uuid.UUID, seen: str, timeout: float) -> None:
        """Return when the job's etag differs from ``seen``, after ``timeout`` seconds, or at shutdown."""
        if self.draining or timeout <= 0:
            return
        entry = (seen, asyncio.Event())
        self._waiters.setdefault(job_id, []).append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hipp-job-watcher")
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await entry[1].wait()
        finally:
            waiting = self._waiters.get(job_id, [])
            if entry in waiting:
                waiting.remove(entry)
            if not waiting:
                self._waiters.pop(job_id, None)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def _read(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        out: dict[uuid.UUID, str] = {}
        with self.read_sessions() as session:
            for i in range(0, len(ids), 500):
                rows = session.execute(select(Job.id, *VERSION_COLUMNS).where(Job.id.in_(ids[i : i + 500])))
                for row in rows:
                    out[row[0]] = etag(*row[1:])
        return out

    async def _run(self) -> None:
        while self._waiters:
            await asyncio.sleep(self.tick_s)
            if self.draining:
                self._wake(lambda _job, _seen: True)
                continue
            try:
                current = await anyio.to_thread.run_sync(self._read, list(self._waiters))
            except Exception as exc:  # the database is away: waiters time out and read the job themselves
                log.warning("job watcher: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                continue
            self._wake(lambda job, seen, now=current: now.get(job) != seen)  # type: ignore[misc]

    def _wake(self, changed: Callable[[uuid.UUID, str], bool]) -> None:
        for job_id, waiting in list(self._waiters.items()):
            for seen, event in waiting:
                if changed(job_id, seen):
                    event.set()

    def drain(self) -> None:
        """Answer every waiting request now and let no new one wait (safe to call from a signal handler: it
        only sets a flag; the watcher wakes the waiters within a tick)."""
        self.draining = True

    async def close(self) -> None:
        self.draining = True
        self._wake(lambda _job, _seen: True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def drain_on_signals(watcher: JobWatcher) -> Callable[[], None]:
    """Chain a drain in front of the server's SIGTERM/SIGINT handlers (uvicorn's, which start its graceful
    shutdown), so long-polls in flight are answered instead of holding the shutdown up. Returns an undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Callable[..., Any] = previous) -> None:
            watcher.drain()
            previous(signum, frame)

        installed[sig] = previous
        signal.signal(sig, handler)

    def undo() -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in installed.items():
                signal.signal(sig, previous)

    return undo
