"""Database access that cannot starve, a fast 503 when the pool is truly exhausted, and servers that stop when
told: ``hipp serve`` leaves no worker or beat behind after SIGTERM/SIGINT, and long-polls in flight are answered
at shutdown. (How fast under how much load is measured by ``python -m bench.load``, not here.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import event

from app.config import Settings
from bench.load_servers import alive
from tests.service.conftest import auth, free_port

CLI = [sys.executable, "-m", "worker.cli"]
BODY = {"model": "tiny-llava", "preference": {"utility": 1.0}, "evaluation": {"enabled": False}}


@pytest.fixture
def small_app(stack_settings: Settings) -> Iterator[tuple[object, Settings]]:
    """The API with 2 route threads (so a 4 + 4 connection pool) and a short pool timeout, and no key cache:
    every request checks its key in the database."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = stack_settings.model_copy(update={"api_threads": 2, "db_pool_timeout_s": 0.5, "api_key_cache_s": 0})
    with TestClient(create_app(settings)) as c:
        yield c, settings


def test_one_connection_per_request_and_none_held_while_waiting(small_app, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    client, settings = small_app
    engine = client.app.state.runtime.db.engine
    in_use = 0
    peak = 0
    lock = threading.Lock()

    def checkout(*_: object) -> None:
        nonlocal in_use, peak
        with lock:
            in_use += 1
            peak = max(peak, in_use)

    def checkin(*_: object) -> None:
        nonlocal in_use
        with lock:
            in_use -= 1

    jobs = [client.post("/jobs", json=BODY, headers=auth(tenant_key)).json()["id"] for _ in range(3)]
    event.listen(engine.pool, "checkout", checkout)
    event.listen(engine.pool, "checkin", checkin)
    try:
        calls = [("GET", f"/jobs/{jobs[i % 3]}") for i in range(60)]
        calls += [("GET", f"/jobs/{jobs[i % 3]}/events") for i in range(30)]
        calls += [("GET", "/jobs") for _ in range(10)]
        calls += [("POST", "/jobs") for _ in range(10)]
        calls += [("POST", f"/jobs/{jobs[0]}/cancel")]

        def call(c: tuple[str, str]) -> int:
            body = BODY if c == ("POST", "/jobs") else None
            return int(client.request(c[0], c[1], json=body, headers=auth(tenant_key)).status_code)

        with ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(call, calls))
    finally:
        event.remove(engine.pool, "checkout", checkout)
        event.remove(engine.pool, "checkin", checkin)
    assert all(code in (200, 201, 202) for code in codes), sorted(set(codes))
    # Two route threads, one connection each, plus the dispatcher's: never more, whatever the concurrency.
    assert peak <= settings.api_threads + 1, peak


def test_an_exhausted_pool_is_a_503_with_retry_after(small_app, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    client, settings = small_app
    job = client.post("/jobs", json=BODY, headers=auth(tenant_key)).json()["id"]
    engine = client.app.state.runtime.db.engine
    held = [engine.connect() for _ in range(engine.pool.size() + engine.pool._max_overflow)]  # type: ignore[attr-defined]
    try:
        r = client.get(f"/jobs/{job}", headers=auth(tenant_key))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_busy" and r.headers["Retry-After"] == "1"
    finally:
        for conn in held:
            conn.close()
    assert client.get(f"/jobs/{job}", headers=auth(tenant_key)).status_code == 200


# --- stopping -------------------------------------------------------------------------------------------------
def _serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env.update(HIPP_HOME=str(home), HIPP_PUBLIC_URL=url, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    key = subprocess.run(
        [*CLI, "api-key", "create", "--tenant", "t"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([*CLI, "serve", "--port", str(port), *extra], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(0.3)
    return server, url, key, home


def _celery(proc: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "celery" in " ".join(child.cmdline()):
                out.append(child)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sig", "extra"),
    [(signal.SIGTERM, ()), (signal.SIGINT, ()), (signal.SIGTERM, ("--api-processes", "2"))],
    ids=["SIGTERM", "SIGINT", "SIGTERM-2-API-processes"],
)
def test_serve_stops_its_worker_and_beat(tmp_path: Path, sig: signal.Signals, extra: tuple[str, ...]) -> None:
    server, url, key, home = _serve(tmp_path, *extra)
    try:
        proc = psutil.Process(server.pid)
        deadline = time.monotonic() + 60
        while len(_celery(proc)) < 3:  # the worker, its pool child and its beat
            assert time.monotonic() < deadline, [c.cmdline() for c in proc.children(recursive=True)]
            time.sleep(0.3)
        if sig == signal.SIGTERM:  # stop it in the middle of a job
            job = httpx.post(f"{url}/jobs", json=BODY, headers=auth(key)).json()["id"]
            deadline = time.monotonic() + 120
            while httpx.get(f"{url}/jobs/{job}", headers=auth(key)).json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.3)
        children = [c.pid for c in proc.children(recursive=True)]
        server.send_signal(sig)
        assert server.wait(timeout=60) == 0
        deadline = time.monotonic() + 5  # init may take a moment to reap what the worker left
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(children), f"outlived hipp serve: {alive(children)}"
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.timeout(120)
def test_shutdown_answers_long_polls_in_flight(tmp_path: Path) -> None:
    server, url, key, _ = _serve(tmp_path, "--no-worker")
    try:
        job = httpx.post(f"{url}/jobs", json=BODY, headers=auth(key)).json()["id"]
        answers: list[httpx.Response | Exception] = []

        def long_poll() -> None:
            try:
                answers.append(httpx.get(f"{url}/jobs/{job}", params={"wait": 60}, headers=auth(key), timeout=90))
            except Exception as exc:
                answers.append(exc)

        polls = [threading.Thread(target=long_poll) for _ in range(5)]
        for t in polls:
            t.start()
        time.sleep(1.5)  # let them reach the server
        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        for t in polls:
            t.join(timeout=60)
        assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers
        assert all(a.json()["id"] == job for a in answers if isinstance(a, httpx.Response))
        # Answered at the signal, not when their 60 s wait ran out.
        assert time.monotonic() - t0 < 45
    finally:
        if server.poll() is None:
            server.kill()
    assert uuid.UUID(job)
