"""Hardening, round two (issue 18): each defect an adversarial pass found, reproduced as a test. They run on
Postgres + Redis + S3 (moto) and, where the embedded default behaved differently, on SQLite too. Worker
process behaviour (scheduler, cancelled jobs, kill -9) is in tests/faults/test_hardening_faults.py."""

from __future__ import annotations

import json
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.db import session_scope
from app.migrate import upgrade
from app.models import Job
from app.security import create_api_key
from tests.service.conftest import auth

GOOD: dict[str, Any] = {"model": "tiny-llava", "preference": {"utility": 0.5, "robustness": 0.3, "compression": 0.2}}


def sqlite_settings(home: Path, **over: Any) -> Settings:
    return Settings(home=home, signing_secret="s", public_url="http://public.example:8000", **over)


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[tuple[Any, str, Settings]]:
    """The embedded default's API (SQLite, filesystem broker, local store), with a tenant key."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = sqlite_settings(tmp_path / "home")
    settings.home.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        key, _ = create_api_key(s, "sqlite-tenant")
    with TestClient(create_app(settings)) as c:
        yield c, key, settings


def jobs_of(url: str, key_tenant: str | None = None) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


# --- 1. lone surrogates: 4xx at the edge, nothing committed -------------------------------------------------
SURROGATE_BODIES = [
    '{"model": "tiny-llava", "preference": {"utility": 1}, "metadata": {"a": "\\ud800"}}',
    '{"model": "tiny-llava", "preference": {"utility": 1}, "metadata": {"\\udfff": 1}}',
    '{"model": "tiny-llava\\ud800", "preference": {"utility": 1}}',
    '{"model": "tiny-llava", "preference": {"utility": 1}, "metadata": {"a": ["x", {"b": "\\udc00"}]}}',
]


@pytest.mark.parametrize("raw", SURROGATE_BODIES)
def test_lone_surrogate_is_422_and_nothing_is_committed(client, tenant_key, stack_settings, raw: str) -> None:  # type: ignore[no-untyped-def]
    before = jobs_of(stack_settings.resolved_database_url)
    r = client.post("/jobs", content=raw, headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "surrogate" in r.json()["error"]["message"]
    assert jobs_of(stack_settings.resolved_database_url) == before
    # the tenant's listing still works on the same connection
    assert client.get("/jobs", headers=auth(tenant_key)).status_code == 200


def test_lone_surrogate_on_sqlite_and_in_policies(sqlite_api) -> None:  # type: ignore[no-untyped-def]
    c, key, settings = sqlite_api
    r = c.post("/jobs", content=SURROGATE_BODIES[0], headers={**auth(key), "Content-Type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.text
    assert jobs_of(settings.resolved_database_url) == 0
    raw = '{"name": "p", "model": "tiny-llava", "metrics": {"x": "\\ud800"}}'
    r = c.post("/policies", content=raw, headers={**auth(key), "Content-Type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.text


def test_a_stored_surrogate_does_not_break_reads(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    """A row written before the edge check (or by another tool) is still readable: escaped, not a 500."""
    job_id = client.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    from sqlalchemy import update

    with session_scope(stack_settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(meta={"a": "\ud800"}))
    r = client.get(f"/jobs/{job_id}", headers=auth(tenant_key))
    assert r.status_code == 200 and json.loads(r.text)["metadata"] == {"a": "\ud800"}
    assert client.get("/jobs", headers=auth(tenant_key)).status_code == 200
    assert client.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key)).status_code == 202


# --- 4. deep nesting, huge event cursors, NaN in metadata ---------------------------------------------------
@pytest.mark.parametrize("depth", [40, 255, 600, 990])
def test_deep_nesting_is_422(client, tenant_key, depth: int) -> None:  # type: ignore[no-untyped-def]
    nested = '{"a":' * depth + "1" + "}" * depth
    raw = '{"model": "tiny-llava", "preference": {"utility": 1}, "metadata": ' + nested + "}"
    r = client.post("/jobs", content=raw, headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) in ((422, "invalid_request"), (400, "invalid_body")), r.text
    assert "nested" in r.json()["error"]["message"]


def test_nesting_within_the_limit_is_accepted(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    nested: Any = 1
    for _ in range(20):
        nested = {"a": nested}
    r = client.post("/jobs", json={**GOOD, "metadata": nested}, headers=auth(tenant_key))
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_metadata_is_422(client, tenant_key, literal: str) -> None:  # type: ignore[no-untyped-def]
    raw = '{"model": "tiny-llava", "preference": {"utility": 1}, "metadata": {"x": ' + literal + "}}"
    r = client.post("/jobs", content=raw, headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert r.status_code == 422 and "NaN" in r.json()["error"]["message"]


@pytest.mark.parametrize("after", [2**63, 2**63 + 5, 10**30, -1])
def test_events_after_out_of_range_is_4xx(client, tenant_key, after: int) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    r = client.get(f"/jobs/{job_id}/events", params={"after": after}, headers=auth(tenant_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    r = client.get(f"/jobs/{job_id}/events", params={"cursor": str(after)}, headers=auth(tenant_key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor", r.text
    assert client.get(f"/jobs/{job_id}/events", params={"after": 2**63 - 1}, headers=auth(tenant_key)).json() == {
        "items": [],
        "next_cursor": None,
    }


def test_events_after_out_of_range_on_sqlite(sqlite_api) -> None:  # type: ignore[no-untyped-def]
    c, key, _ = sqlite_api
    job_id = c.post("/jobs", json=GOOD, headers=auth(key)).json()["id"]
    assert c.get(f"/jobs/{job_id}/events", params={"after": 2**64}, headers=auth(key)).status_code == 422
    assert c.get(f"/jobs/{job_id}/events", params={"after": 2**63 - 1}, headers=auth(key)).status_code == 200


# --- 11. strict types --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"preference": {"utility": "0.5"}}, "preference.utility"),
        ({"preference": {"utility": True}}, "preference.utility"),
        ({"preference": {"utility": 1, "compression": False}}, "preference.compression"),
        ({"target_sparsity": "0.3"}, "target_sparsity"),
        ({"target_sparsity": True}, "target_sparsity"),
        ({"recovery": {"steps": "10"}}, "recovery.steps"),
        ({"recovery": {"steps": 1.5}}, "recovery.steps"),
        ({"recovery": {"steps": True}}, "recovery.steps"),
        ({"recovery": {"learning_rate": "0.1"}}, "recovery.learning_rate"),
        ({"evaluation": {"enabled": "yes"}}, "evaluation.enabled"),
        ({"evaluation": {"enabled": 1}}, "evaluation.enabled"),
        ({"evaluation": {"max_samples": "4"}}, "evaluation.max_samples"),
        ({"calibration": {"samples": "4"}}, "calibration.samples"),
        ({"model": 123}, "model"),
    ],
)
def test_no_type_coercion(client, tenant_key, patch: dict[str, Any], field: str) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/jobs", json={**GOOD, **patch}, headers=auth(tenant_key))
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_integers_are_still_numbers(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/jobs", json={**GOOD, "preference": {"utility": 1, "compression": 3}}, headers=auth(tenant_key))
    assert r.status_code == 201 and r.json()["preference"]["compression"] == 0.75


# --- 12. content type and chunked bodies -------------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415_naming_the_header(client, tenant_key, ctype: str | None) -> None:  # type: ignore[no-untyped-def]
    headers = auth(tenant_key)
    if ctype is not None:
        headers["Content-Type"] = ctype
    r = client.post("/jobs", content=json.dumps(GOOD), headers=headers)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_media_type" and "Content-Type: application/json" in err["message"]
    headers = {**auth(tenant_key), "Content-Type": "application/json; charset=utf-8"}
    ok = client.post("/jobs", content=json.dumps(GOOD), headers=headers)
    assert ok.status_code == 201


def test_chunked_oversized_body_is_413(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    big = json.dumps({**GOOD, "metadata": {"x": "y" * (10 * 1024 * 1024)}}).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = client.post("/jobs", content=chunks(), headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "body_too_large"

    small = json.dumps(GOOD).encode()
    headers = {**auth(tenant_key), "Content-Type": "application/json"}
    r = client.post("/jobs", content=iter([small[:10], small[10:]]), headers=headers)
    assert r.status_code == 201, r.text


# --- 2. per-tenant quota on SQLite under parallel submits --------------------------------------------------
def test_quota_holds_on_sqlite_under_parallel_submits(tmp_path: Path) -> None:
    import uvicorn

    from app.main import create_app
    from tests.service.conftest import free_port

    settings = sqlite_settings(tmp_path / "home", max_active_jobs_per_tenant=20)
    settings.home.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        key, _ = create_api_key(s, "quota")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.05)
        codes: list[int] = []
        barrier = threading.Barrier(30)

        def one(i: int) -> None:
            body = {**GOOD, "metadata": {"i": i}}
            barrier.wait()
            r = httpx.post(f"http://127.0.0.1:{port}/jobs", json=body, headers=auth(key), timeout=60)
            codes.append(r.status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert sorted(set(codes)) == [201, 429], codes
    assert codes.count(201) == 20, codes
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 20


# --- 14. leaks ---------------------------------------------------------------------------------------------
def test_401_does_not_echo_the_key(client) -> None:  # type: ignore[no-untyped-def]
    secret = "hipp_abcdef123456_topsecretvalue"
    r = client.get("/jobs", headers=auth(secret))
    assert r.status_code == 401
    assert "abcdef" not in r.text and "hipp_" not in r.text.replace("hipp api-key", "")


def test_sqlite_database_file_is_private(sqlite_api) -> None:  # type: ignore[no-untyped-def]
    _, _, settings = sqlite_api
    path = settings.home / "hipp.db"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        other = Path(str(path) + suffix)
        if other.exists():
            assert stat.S_IMODE(os.stat(other).st_mode) & 0o077 == 0, suffix


def test_a_new_engine_on_an_open_sqlite_file_keeps_the_open_connections_fresh(tmp_path: Path) -> None:
    """Building a second engine on a SQLite file this process has open (each API runtime builds its own)
    must not drop this process's locks on it: another process's last close would then take the WAL away
    and the open connections would read a stale snapshot for good (jobs seen queued forever)."""
    import subprocess
    import sys

    from sqlalchemy import text

    from app.db import Database

    path = tmp_path / "x.db"
    first = Database(f"sqlite:///{path}")
    with first.scope() as s:
        s.execute(text("CREATE TABLE t (v INTEGER)"))
        s.execute(text("INSERT INTO t VALUES (1)"))
    with first.read_sessions() as s:  # the connection stays open in the pool
        assert s.scalar(text("SELECT v FROM t")) == 1
    second = Database(f"sqlite:///{path}")
    # Another process writes and closes (the last connection, had this process lost its locks), then a third
    # writes and stays connected while this process reads.
    write = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('UPDATE t SET v = v + 1'); c.commit()"
    subprocess.run([sys.executable, "-c", write + "; c.close()", str(path)], check=True, timeout=60)
    stay = write + "; print('ok', flush=True); sys.stdin.read(); c.close()"
    writer = subprocess.Popen([sys.executable, "-c", stay, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ok"
        with first.read_sessions() as s:
            assert s.scalar(text("SELECT v FROM t")) == 3
    finally:
        writer.communicate(timeout=60)
    first.dispose()
    second.dispose()


def test_metrics_without_auth_do_not_show_job_counts(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    client.post("/jobs", json=GOOD, headers=auth(tenant_key))
    text = client.get("/metrics").text
    assert "hipp_http_requests_total" in text
    assert "hipp_jobs{" not in text and "hipp_oldest_queued" not in text
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(stack_settings.model_copy(update={"metrics_token": "scrape-me"}))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth("wrong")).status_code == 401
        r = c.get("/metrics", headers=auth("scrape-me"))
        assert r.status_code == 200 and 'hipp_jobs{status="queued"}' in r.text


# --- 13. signed URLs use HIPP_PUBLIC_URL; HEAD works ---------------------------------------------------------
def test_signed_urls_ignore_the_host_header_and_answer_head(sqlite_api) -> None:  # type: ignore[no-untyped-def]
    c, key, settings = sqlite_api
    from app.db import session_scope as scope
    from app.models import Artifact
    from app.storage import get_storage

    job_id = c.post("/jobs", json=GOOD, headers=auth(key)).json()["id"]
    obj = get_storage(settings).put_bytes(f"jobs/{job_id}/metrics.json", b'{"a": 1}')
    with scope(settings.resolved_database_url) as s:
        s.add(Artifact(job_id=uuid.UUID(job_id), kind="metrics", name="metrics.json", key=obj.key, size=obj.size,
                       sha256=obj.sha256, content_type="application/json"))
    arts = c.get(f"/jobs/{job_id}/artifacts", headers={**auth(key), "Host": "evil.example"}).json()
    assert arts[0]["url"].startswith("http://public.example:8000/files/"), arts
    r = c.get(f"/jobs/{job_id}/artifacts/metrics.json", headers={**auth(key), "Host": "evil.example"},
              follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].startswith("http://public.example:8000/")
    path = arts[0]["url"].removeprefix("http://public.example:8000")
    head = c.head(path)
    assert head.status_code == 200 and head.headers["content-length"] == str(obj.size) and head.content == b""
    assert c.get(path).content == b'{"a": 1}'
    assert c.head(path.replace("sig=", "sig=0")).status_code == 403


# --- 9. the CLI rides out a brief outage while waiting ------------------------------------------------------
def test_jobs_wait_retries_brief_connection_errors() -> None:
    import subprocess
    import sys
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.service.conftest import free_port

    port = free_port()
    answers = iter([503, "running", "running", "succeeded"])

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            answer = next(answers, "succeeded")
            if answer == 503:
                body = json.dumps({"error": {"code": "database_unavailable", "message": "x", "detail": None}})
                self.send_response(503)
            else:
                job = {"id": "j", "status": answer, "stage": None, "progress": 1.0, "error": None,
                       "result": {"metrics": {"ok": 1}}}
                body = json.dumps(job)
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
    cmd = [sys.executable, "-m", "worker.cli.serve", "jobs", "--url", f"http://127.0.0.1:{port}", "--key", "k",
           "wait", "j"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # the API is down (connection refused) for the first seconds of the wait
    assert proc.poll() is None, proc.communicate()
    server = ThreadingHTTPServer(("127.0.0.1", port), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "succeeded"


# --- 3. rate limit and fair order ---------------------------------------------------------------------------
def test_submit_and_cancel_are_rate_limited_per_tenant(stack_settings: Settings, tenant_key: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = stack_settings.model_copy(update={"rate_limit_per_minute": 6.0, "rate_limit_burst": 3})
    with session_scope(settings.resolved_database_url) as s:
        other, _ = create_api_key(s, f"other-{uuid.uuid4().hex[:6]}")
    with TestClient(create_app(settings)) as c:
        ids = [c.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"] for _ in range(3)]
        r = c.post("/jobs", json=GOOD, headers=auth(tenant_key))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 10
        assert c.post("/jobs", json=GOOD, headers=auth(other)).status_code == 201  # another tenant is not slowed
        for job_id in ids:
            assert c.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key)).status_code == 202
        r = c.post(f"/jobs/{ids[0]}/cancel", headers=auth(tenant_key))
        assert r.status_code == 429 and "Retry-After" in r.headers
        assert c.get(f"/jobs/{ids[0]}", headers=auth(tenant_key)).status_code == 200  # reads are not limited


def test_fair_order_publishes_one_waiting_job_per_tenant(stack_settings: Settings) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from app.db import session_factory
    from app.main import create_app
    from app.queue import relay_pending

    queue = f"fair-{uuid.uuid4().hex[:6]}"
    settings = stack_settings.model_copy(update={"max_waiting_per_tenant": 1, "gpu_queue": queue})
    with session_scope(settings.resolved_database_url) as s:
        a, _ = create_api_key(s, f"a-{uuid.uuid4().hex[:6]}")
        b, _ = create_api_key(s, f"b-{uuid.uuid4().hex[:6]}")
    factory = session_factory(settings.resolved_database_url)
    with TestClient(create_app(settings)) as c:
        a_ids = [c.post("/jobs", json=GOOD, headers=auth(a)).json()["id"] for _ in range(4)]
        b_ids = [c.post("/jobs", json=GOOD, headers=auth(b)).json()["id"] for _ in range(1)]
        assert c.app.state.runtime.dispatcher.flush()

    def enqueued(ids: list[str]) -> list[bool]:
        with session_scope(settings.resolved_database_url) as s:
            jobs = s.scalars(select(Job).where(Job.id.in_([uuid.UUID(i) for i in ids])))
            rows = {str(j.id): j.enqueued_at is not None for j in jobs}
        return [rows[i] for i in ids]

    assert enqueued(a_ids) == [True, False, False, False]  # A's backlog stays out of the broker ...
    assert enqueued(b_ids) == [True]  # ... so B's job is next after A's first
    relay_pending(settings, factory, min_age_s=0)
    assert enqueued(a_ids) == [True, False, False, False]  # still one waiting: nothing more to publish
    with session_scope(settings.resolved_database_url) as s:  # a worker claims A's first job
        s.execute(update(Job).where(Job.id == uuid.UUID(a_ids[0])).values(status="running"))
    relay_pending(settings, factory, min_age_s=0)
    assert enqueued(a_ids) == [True, True, False, False]


# --- 7. retention ------------------------------------------------------------------------------------------
def _finished_job_with_files(client, key: str, settings: Settings, finished_days_ago: float = 0) -> str:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from sqlalchemy import update

    from app.models import Artifact, utcnow
    from app.storage import get_storage

    job_id = client.post("/jobs", json=GOOD, headers=auth(key)).json()["id"]
    storage = get_storage(settings)
    stage = storage.put_bytes(f"jobs/{job_id}/stages/prune.safetensors", b"w" * 1000)
    ckpt = storage.put_bytes(f"jobs/{job_id}/checkpoint.tar", b"c" * 500)
    with session_scope(settings.resolved_database_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status="succeeded", finished_at=utcnow() - timedelta(days=finished_days_ago),
                    stage_outputs={"weights": {"key": stage.key}, "completed": ["prune"]})
        )
        s.add(Artifact(job_id=uuid.UUID(job_id), kind="checkpoint", name="checkpoint.tar", key=ckpt.key,
                       size=ckpt.size, sha256=ckpt.sha256))
    return job_id


def test_delete_a_finished_job_removes_its_files_and_rows(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    from app.storage import get_storage

    storage = get_storage(stack_settings)
    queued = client.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    r = client.delete(f"/jobs/{queued}", headers=auth(tenant_key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_active"
    job_id = _finished_job_with_files(client, tenant_key, stack_settings)
    assert client.get("/usage", headers=auth(tenant_key)).json() == {"jobs": 2, "artifacts": 1, "artifact_bytes": 500}
    with session_scope(stack_settings.resolved_database_url) as s:
        other, _ = create_api_key(s, f"other-{uuid.uuid4().hex[:6]}")
    assert client.delete(f"/jobs/{job_id}", headers=auth(other)).status_code == 404  # another tenant's
    assert client.delete(f"/jobs/{job_id}", headers=auth(tenant_key)).status_code == 204
    assert not storage.exists(f"jobs/{job_id}/checkpoint.tar")
    assert not storage.exists(f"jobs/{job_id}/stages/prune.safetensors")
    assert client.get(f"/jobs/{job_id}", headers=auth(tenant_key)).status_code == 404
    assert client.delete(f"/jobs/{job_id}", headers=auth(tenant_key)).status_code == 404
    assert client.get("/usage", headers=auth(tenant_key)).json() == {"jobs": 1, "artifacts": 0, "artifact_bytes": 0}


def test_the_retention_sweep_deletes_stage_outputs_and_old_artifacts(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    from app.db import session_factory
    from app.retention import sweep
    from app.storage import get_storage

    settings = stack_settings.model_copy(update={"artifact_retention_s": 7 * 24 * 3600})
    storage = get_storage(settings)
    old = _finished_job_with_files(client, tenant_key, settings, finished_days_ago=8)
    new = _finished_job_with_files(client, tenant_key, settings, finished_days_ago=1)
    done = sweep(settings, session_factory(settings.resolved_database_url), storage, limit=10_000)
    assert done.stage_outputs >= 2 and done.artifacts >= 1
    assert not storage.exists(f"jobs/{old}/checkpoint.tar")
    assert not storage.exists(f"jobs/{old}/stages/prune.safetensors")
    assert storage.exists(f"jobs/{new}/checkpoint.tar") and not storage.exists(f"jobs/{new}/stages/prune.safetensors")
    assert client.get(f"/jobs/{old}/artifacts", headers=auth(tenant_key)).json() == []
    assert len(client.get(f"/jobs/{new}/artifacts", headers=auth(tenant_key)).json()) == 1
    events = client.get(f"/jobs/{old}/events", headers=auth(tenant_key)).json()["items"]
    assert any("retention" in e["message"] for e in events)


def test_signed_file_urls_refuse_odd_signatures_and_keys(sqlite_api) -> None:  # type: ignore[no-untyped-def]
    """Found by schemathesis on the embedded default: a non-ASCII signature was a 500."""
    import time

    from app.security import sign

    c, _, settings = sqlite_api
    expires = int(time.time()) + 60
    r = c.get("/files/jobs/x/a.bin", params={"expires": expires, "filename": "a.bin", "sig": "\U000431fc"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_signature"
    # a correctly signed key that leaves the store is still refused
    secret = settings.resolved_signing_secret
    for key in ("jobs/../../../etc/passwd", "jobs/./x"):
        sig = sign(secret, key, expires, "p")
        path = key.replace(".", "%2e")  # percent-encoded, so the client does not normalize the dots away
        r = c.get(f"/files/{path}", params={"expires": expires, "filename": "p", "sig": sig})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_key", r.text
