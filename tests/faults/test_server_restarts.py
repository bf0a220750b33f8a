"""Servers restarted under load, each a throwaway instance on a free port (never the shared ones):

- Redis (no persistence) killed and restarted while one job runs, one is queued (its message is lost with
  the server) and one is submitted during the outage: all three finish, once each.
- Postgres stopped and started: the API answers 503 ``database_unavailable`` during the outage and recovers
  by itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from tests.faults.conftest import FINAL, Proc, auth, beat_worker, gpu_worker, wait_for
from tests.service.conftest import free_port
from tests.service.test_datasets import ready_conversations

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on port {port} after {timeout}s")


class OwnRedis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = Proc([*cmd, "--dir", str(folder)], dict(os.environ), folder / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc.start()
        _wait_port(self.port)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    r = OwnRedis(tmp_path)
    r.start()
    yield r
    r.proc.kill9()


BUSY_STAGES = ("sensitivity", "plan", "prune", "recover")


def test_redis_restart_with_jobs_queued_and_running(  # type: ignore[no-untyped-def]
    own_redis: OwnRedis, fault_settings: Settings, tenant_key: str, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = fault_settings.model_copy(update={"broker_url": own_redis.url})
    beat = beat_worker(settings, tmp_path).start()
    worker = gpu_worker(settings, tmp_path / "worker.log").start()
    body: dict[str, Any] = {"model": "tiny-llava", "preference": {"utility": 1}, "evaluation": {"enabled": False}}
    try:
        with TestClient(create_app(settings)) as api:

            def submit(extra: dict[str, Any]) -> str:
                r = api.post("/jobs", json={**body, **extra}, headers=auth(tenant_key))
                assert r.status_code == 201, r.text
                return str(r.json()["id"])

            def get(job_id: str) -> dict[str, Any]:
                return dict(api.get(f"/jobs/{job_id}", headers=auth(tenant_key)).json())

            # Long enough (recovery steps) that it is still running when the broker dies, whatever the machine's
            # speed: a 0.2 s poll can miss a short stage altogether.
            conversations = {"recovery": ready_conversations(api, settings, tenant_key)}
            running = submit({"calibration": {"sensitivity_samples": 32}, "recovery": {"steps": 40, "batch_size": 1},
                              "data": conversations})
            queued = submit({})
            wait_for(lambda: get(running), lambda j: j["status"] == "running" and j["stage"] in BUSY_STAGES, 120,
                     "the first job to run")
            assert get(queued)["status"] == "queued"
            own_redis.proc.kill9()  # the queued job's message is lost with the server
            during = submit({})  # accepted while the broker is down; the outbox relay publishes it later
            time.sleep(1.0)
            own_redis.start()
            for job_id in (running, queued, during):
                job = wait_for(lambda j=job_id: get(j), lambda j: j["status"] in FINAL, 150, f"job {job_id}")
                assert job["status"] == "succeeded" and job["attempt"] == 1, job
                msgs = [
                    e["message"] for e in api.get(f"/jobs/{job_id}/events", headers=auth(tenant_key)).json()["items"]
                ]
                assert msgs.count("job succeeded") == 1 and msgs.count("load started") == 1, msgs
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.tail()}\n{beat.tail()}") from None
    finally:
        worker.stop()
        beat.stop()


class OwnPostgres:
    """initdb + pg_ctl on a free port, data in a temp dir (run as the postgres user when we are root)."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not bins:
            pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bindir = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="hipp-pg-"))
        os.chmod(self.dir, 0o777)
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_pg, str(self.bindir / tool), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout[-1500:]} {out.stderr[-1500:]}"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "pg.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        subprocess.run(
            [*self.as_pg, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def test_postgres_restart_gives_503_then_recovers(fault_settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from app.db import dispose_all, session_scope
    from app.main import create_app
    from app.migrate import upgrade
    from app.security import create_api_key

    pg = OwnPostgres()
    try:
        pg.start()
        upgrade(pg.url)
        with session_scope(pg.url) as s:
            key, _ = create_api_key(s, "pg-restart", "test")
        settings = fault_settings.model_copy(update={"database_url": pg.url})
        with TestClient(create_app(settings), raise_server_exceptions=False) as api:
            body = {"model": "tiny-llava", "preference": {"utility": 1}}
            r = api.post("/jobs", json=body, headers=auth(key))
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            assert api.get(f"/jobs/{job_id}", headers=auth(key)).status_code == 200

            pg.stop()
            for method, path in (("GET", f"/jobs/{job_id}"), ("GET", "/jobs"), ("POST", "/jobs")):
                r = api.request(method, path, headers=auth(key), json=body if method == "POST" else None)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "database_unavailable" and r.headers["Retry-After"]
            api.app.state.runtime.keys.clear()  # an uncached key needs the database too: still 503, never 500 or 401
            assert api.get(f"/jobs/{job_id}", headers=auth(key)).status_code == 503
            assert api.get("/readyz").status_code == 503
            assert api.get("/healthz").status_code == 200

            pg.start()
            started = time.monotonic()
            job = wait_for(
                lambda: {"code": (r := api.get(f"/jobs/{job_id}", headers=auth(key))).status_code, **r.json()},
                lambda j: j["code"] == 200,
                30,
                "the API to recover",
            )
            assert job["id"] == job_id and job["status"] == "queued"
            assert api.post("/jobs", json=body, headers=auth(key)).status_code == 201
            print(f"postgres restart: API answered 200 again {time.monotonic() - started:.2f}s after the restart")
    finally:
        dispose_all()
        pg.destroy()
