"""Reliability pieces without a worker: the reaper's three outcomes, the per-tenant active-job quota (429),
idempotency and tenant isolation of events and artifacts."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import update

from app.config import Settings
from app.db import session_factory, session_scope
from app.models import Job, utcnow
from app.reaper import reap_stale
from app.security import create_api_key
from tests.service.conftest import auth

BODY = {"model": "tiny-llava", "preference": {"utility": 1}}


def _submit(client, key: str, **headers: str) -> dict:  # type: ignore[no-untyped-def]
    r = client.post("/jobs", json=BODY, headers={**auth(key), **headers})
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def test_reaper_requeues_fails_at_the_cap_and_finishes_cancels(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    ids = [uuid.UUID(_submit(client, tenant_key)["id"]) for _ in range(4)]
    past = utcnow() - timedelta(seconds=60)
    states = [("running", 1), ("running", 3), ("cancelling", 2), ("running", 1)]
    with session_scope(stack_settings.resolved_database_url) as s:
        for job_id, (status, attempt) in zip(ids, states, strict=True):
            expires = past if job_id != ids[3] else utcnow() + timedelta(seconds=60)  # the last one is alive
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=status, attempt=attempt, lease_owner="dead:1", lease_expires_at=expires, stage="plan")
            )
    reaped = reap_stale(stack_settings, session_factory(stack_settings.resolved_database_url))
    assert set(reaped.requeued) >= {ids[0]} and ids[1] in reaped.failed and ids[2] in reaped.cancelled
    jobs = [client.get(f"/jobs/{i}", headers=auth(tenant_key)).json() for i in ids]
    assert jobs[0]["status"] == "queued" and jobs[0]["error"]["code"] == "worker_lost"
    assert jobs[1]["status"] == "failed" and jobs[1]["error"]["code"] == "attempts_exhausted"
    assert jobs[1]["error"]["retryable"] is False and "3 of 3" in jobs[1]["error"]["message"]
    assert jobs[2]["status"] == "cancelled" and jobs[3]["status"] == "running"
    events = [e["message"] for e in client.get(f"/jobs/{ids[0]}/events", headers=auth(tenant_key)).json()["items"]]
    assert any("re-queued" in m for m in events) and events[-1] == "job enqueued"  # published again
    # a second pass finds nothing more to do
    again = reap_stale(stack_settings, session_factory(stack_settings.resolved_database_url))
    assert not set(again.requeued + again.failed + again.cancelled) & set(ids)


def test_active_job_quota_is_429_and_idempotent_replays_do_not_count(stack_settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with session_scope(stack_settings.resolved_database_url) as s:
        key, _ = create_api_key(s, f"quota-{uuid.uuid4().hex[:6]}")
    settings = stack_settings.model_copy(update={"max_active_jobs_per_tenant": 2})
    with TestClient(create_app(settings)) as client:
        first = _submit(client, key, **{"Idempotency-Key": "a"})
        _submit(client, key)
        r = client.post("/jobs", json=BODY, headers=auth(key))
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
        assert "limit is 2" in r.json()["error"]["message"] and r.headers["Retry-After"]
        assert _submit(client, key, **{"Idempotency-Key": "a"})["id"] == first["id"]  # a replay is not a new job
        assert client.post(f"/jobs/{first['id']}/cancel", headers=auth(key)).status_code == 202
        assert client.post("/jobs", json=BODY, headers=auth(key)).status_code == 201  # room again


def test_idempotency_and_isolation_of_events_and_artifacts(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key, **{"Idempotency-Key": "k1"})
    assert _submit(client, tenant_key, **{"Idempotency-Key": "k1"})["id"] == job["id"]
    r = client.post(
        "/jobs", json={**BODY, "preference": {"compression": 1}}, headers={**auth(tenant_key), "Idempotency-Key": "k1"}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    with session_scope(stack_settings.resolved_database_url) as s:
        other, _ = create_api_key(s, f"other-{uuid.uuid4().hex[:6]}")
    # the same key in another tenant is another job
    assert _submit(client, other, **{"Idempotency-Key": "k1"})["id"] != job["id"]
    for path in ("", "/events", "/artifacts", "/artifacts/checkpoint.tar", "/plans"):
        r = client.get(f"/jobs/{job['id']}{path}", headers=auth(other), follow_redirects=False)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert client.post(f"/jobs/{job['id']}/cancel", headers=auth(other)).status_code == 404
