"""Hardening, round two (issue 18), through real worker processes: cancelled jobs are dropped by the worker's
main process without costing a pool child, and the embedded scheduler (``worker -B``) dies with its worker,
so a kill -9 and a restart leave exactly one scheduler."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.config import Settings
from tests.faults.conftest import Proc, auth, celery_cmd, gpu_worker
from tests.service.conftest import stack_env

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]

BODY = {"model": "tiny-llava", "preference": {"utility": 1.0}, "evaluation": {"enabled": False}}


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cancelled_jobs_are_dropped_without_a_worker_child(
    fault_settings: Settings, tenant_key: str, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    queue = fault_settings.gpu_queue + "-d"
    settings = fault_settings.model_copy(update={"max_waiting_per_tenant": 0, "gpu_queue": queue})
    n = 12
    with TestClient(create_app(settings)) as api:
        ids = [api.post("/jobs", json=BODY, headers=auth(tenant_key)).json()["id"] for _ in range(n)]
        assert api.app.state.runtime.dispatcher.flush()
        for job_id in ids:  # queued -> cancelled at once; their messages stay in the broker
            assert api.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key)).json()["status"] == "cancelled"
    worker = gpu_worker(settings, tmp_path / "worker.log").start()
    try:
        assert worker.p is not None
        main = psutil.Process(worker.p.pid)
        child = until(lambda: main.children(), 60, "the pool child")[0].pid
        t0 = time.monotonic()
        until(lambda: worker.tail(200_000).count("dropped") >= n, 60, f"{n} dropped messages\n{worker.tail()}")
        seconds = time.monotonic() - t0
        assert [c.pid for c in main.children()] == [child], "a pool child was replaced for a cancelled job"
        assert "attempt 1 of" not in worker.tail(200_000)
        print(f"{n} cancelled jobs dropped in {seconds:.2f}s without a new child process")
    finally:
        worker.stop()


def embedded_worker(settings: Settings, folder: Path, name: str) -> Proc:
    """The embedded deployment's worker: both queues and beat in one process group (``hipp serve``)."""
    cmd = celery_cmd(f"{settings.gpu_queue},{settings.default_queue}", "-B", "--schedule",
                     str(folder / "celerybeat-schedule"))
    return Proc(cmd, stack_env(settings), folder / f"{name}.log")


def schedulers(folder: Path) -> list[psutil.Process]:
    marker = str(folder / "celerybeat-schedule")
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def test_the_embedded_scheduler_dies_with_its_worker(fault_settings: Settings, tmp_path: Path) -> None:
    first = embedded_worker(fault_settings, tmp_path, "first").start()
    kid_pids: list[int] = []
    try:
        assert first.p is not None
        main = psutil.Process(first.p.pid)
        kids = until(lambda: len(main.children()) == 2 and main.children(), 60, "pool child and beat")
        kid_pids = [k.pid for k in kids]
        until(lambda: "beat: Starting" in first.tail(100_000), 30, f"beat to start\n{first.tail()}")
        os.kill(main.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        first.p.wait(timeout=10)
        until(lambda: not any(running(p) for p in kid_pids), 15, "the orphaned scheduler and pool child to exit")
    finally:  # whatever survived (the orphaned scheduler, when the test fails) goes now
        for pid in [first.p.pid if first.p else 0, *kid_pids]:
            if pid and running(pid):
                os.kill(pid, signal.SIGKILL)
    second = embedded_worker(fault_settings, tmp_path, "second").start()
    try:
        assert second.p is not None
        main = psutil.Process(second.p.pid)
        until(lambda: len(main.children()) == 2, 60, "pool child and beat after the restart")
        # one worker: its main process, its pool child and exactly one scheduler; nothing left of the first
        procs = schedulers(tmp_path)
        assert sorted(p.pid for p in procs) == sorted([main.pid, *(c.pid for c in main.children())]), procs
    finally:
        second.stop()
