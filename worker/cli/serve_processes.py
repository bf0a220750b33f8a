"""The processes ``hipp serve`` runs: the embedded Celery worker (started in a process group of its own and
stopped in order: SIGTERM, then SIGKILL to the whole group at a deadline) and the API under uvicorn, one
process or a supervisor of several, whose first signal also starts stopping the worker.

Imports no torch (the API image runs this); uvicorn only when a server is built.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


def celery_worker_command(queues: str, *extra: str) -> list[str]:
    """One Celery worker process on ``queues`` (comma-separated), one task at a time; the service, its
    tests and the fault tests all start workers with this command."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues,
        "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        *extra,
    ]


def evaluation_worker_command(queue: str, *extra: str) -> list[str]:
    """One evaluation worker process on ``queue`` (``HIPP_EVALUATION_QUEUE``): the evaluation worker's own app
    (``worker.evaluation_worker``: its pool child keeps the loaded model between tasks)."""
    command = celery_worker_command(queue, *extra)
    command[command.index("worker.celery_app")] = "worker.evaluation_worker"
    return command


def worker_command(settings: Any) -> list[str]:
    """The embedded deployment's worker: both queues, with beat (relay and reaper) in the same process."""
    return celery_worker_command(f"{settings.gpu_queue},{settings.default_queue}", "-B", "--schedule",
                                 str((settings.home / "celerybeat-schedule").resolve()))


# SIGTERM/SIGINT received before uvicorn took the signals over: start-up then stops short, and the server
# handles them as soon as it runs. Signal handlers are per process, so this list is too.
early_signals: list[int] = []


def _remember_signal(signum: int, frame: FrameType | None) -> None:
    early_signals.append(signum)


def remember_signals_during_startup() -> None:
    """Until uvicorn takes the signals over, a SIGTERM/SIGINT is remembered in ``early_signals``."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _remember_signal)


def start_worker(settings: Any) -> subprocess.Popen[bytes]:
    """The embedded worker, in a process group of its own: ``stop_worker`` can then reach the beat and pool
    processes it starts, and a Ctrl-C in the terminal reaches ``hipp serve`` only, which stops it in order."""
    env = dict(os.environ, HIPP_HOME=str(settings.home.resolve()))
    log = (settings.home / "worker.log").open("ab")
    try:
        return subprocess.Popen(
            worker_command(settings), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log.close()


def stop_worker(worker: subprocess.Popen[bytes], deadline: float) -> None:
    """SIGTERM (a warm shutdown), and at ``deadline`` (monotonic) SIGKILL to the worker's whole process group,
    whatever is left of it (also when the worker itself exited first and left children behind)."""
    with contextlib.suppress(ProcessLookupError):
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=max(deadline - time.monotonic(), 0.1))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=5)


def uvicorn_server(config: Any, on_signal: Callable[[], None]) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its last step: after a signal-initiated shutdown uvicorn re-raises the signal
        with the default handler, which killed ``hipp serve`` before it could stop its worker. The first signal
        also starts stopping the worker, in parallel with the HTTP shutdown."""

        signalled_at: float | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig in early_signals:  # arrived while starting up
                self.handle_exit(sig, None)
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.signalled_at is None:
                self.signalled_at = time.monotonic()
                on_signal()
            super().handle_exit(sig, frame)

    return Server(config)


def uvicorn_supervisor(config: Any, on_signal: Callable[[], None]) -> Any:
    """uvicorn's supervisor of several API processes (it relays SIGTERM/SIGINT to them and returns), telling
    ``hipp serve`` when the signal came."""
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        signalled_at: float | None = None

        def _signalled(self) -> None:
            if self.signalled_at is None:
                self.signalled_at = time.monotonic()
                on_signal()

        def handle_int(self) -> None:
            self._signalled()
            super().handle_int()

        def handle_term(self) -> None:
            self._signalled()
            super().handle_term()

    return Supervisor(config, sockets=[config.bind_socket()])
