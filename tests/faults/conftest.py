"""Fixtures for the fault tests: real processes (Celery workers, beat, throwaway Redis and Postgres servers)
that the tests kill and restart. The shared Postgres/Redis/moto fixtures come from tests/service.

Every process started here runs in its own session (process group), so a test can ``kill -9`` a whole worker
(its main process and its pool child) without touching anything else; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests.service.conftest import (  # noqa: F401  (fixtures re-exported for this directory)
    auth,
    pg_url,
    redis_url,
    s3_endpoint,
    session_tag,
    stack_env,
    stack_settings,
    tenant_key,
)
from worker.cli.serve import celery_worker_command

FINAL = ("succeeded", "failed", "cancelled")


class Proc:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.cmd, self.env, self.log_path = cmd, env, log_path
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = self.log_path.open("ab")
        self.p = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def _signal_group(self, sig: int) -> None:
        assert self.p is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)

    def kill9(self) -> None:
        """SIGKILL the whole process group (the worker and its pool child): the machine died."""
        if self.p is None:
            return
        self._signal_group(signal.SIGKILL)
        self.p.wait(timeout=10)

    def stop(self) -> None:
        if self.p is None or self.p.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def celery_cmd(queue: str, *extra: str) -> list[str]:
    return celery_worker_command(queue, *extra)


def gpu_worker(settings: Settings, log_path: Path) -> Proc:
    return Proc(celery_cmd(settings.gpu_queue), stack_env(settings), log_path)


def beat_worker(settings: Settings, folder: Path) -> Proc:
    """Beat (relay + reaper schedule) embedded in a light worker on the default queue."""
    cmd = celery_cmd(settings.default_queue, "-B", "--schedule", str(folder / "celerybeat-schedule"))
    return Proc(cmd, stack_env(settings), folder / "beat.log")


def fault_overrides(tag: str) -> dict[str, Any]:
    """Short leases and a fast reaper, so a dead worker is noticed in seconds; fault injection on."""
    return {
        "gpu_queue": f"gpu-{tag}",
        "default_queue": f"default-{tag}",
        "lease_s": 5,
        "heartbeat_s": 1.0,
        "cancel_poll_s": 0.5,
        "reap_interval_s": 1.0,
        "enqueue_retry_s": 2,
        "requeue_after_s": 8,
        "max_attempts": 3,
        "fault_injection": True,
    }


def wait_for(
    fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = fetch()
        if done(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {_brief(last)}")


def _brief(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in ("status", "stage", "stage_progress", "attempt", "error")}


@pytest.fixture(scope="module")
def fault_settings(stack_settings: Settings, request: pytest.FixtureRequest) -> Settings:  # noqa: F811
    tag = f"{stack_settings.gpu_queue.removeprefix('gpu-')}-{request.module.__name__.rsplit('.', 1)[-1][-12:]}"
    return stack_settings.model_copy(update=fault_overrides(tag))


@pytest.fixture
def api(fault_settings: Settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(fault_settings)) as c:
        yield c


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault tests take minutes: they run in their own CI step (``python -m pytest -m fault tests/faults``)
    and are deselected (not skipped) by a plain ``pytest`` run unless the marker expression asks for them."""
    if "fault" in (config.getoption("markexpr") or "") or os.environ.get("HIPP_FAULT_TESTS") == "1":
        return
    faults = [item for item in items if "tests/faults/" in item.nodeid or item.nodeid.startswith("faults/")]
    if faults:
        config.hook.pytest_deselected(items=faults)
        items[:] = [item for item in items if item not in faults]
