"""The API against real Postgres, Redis and S3 (moto): validation, auth, listing, cancel, idempotency, events,
artifacts through presigned URLs, policies, health, metrics. No worker runs here (see test_worker_job.py)."""

from __future__ import annotations

import hashlib
import json
import uuid

import httpx
import pytest
import redis
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.models import Artifact, Job
from app.storage import get_storage
from tests.service.conftest import auth

GOOD = {"model": "tiny-llava", "preference": {"utility": 0.5, "robustness": 0.3, "compression": 0.2}}


def submit(client, key: str, body: dict | None = None, **headers: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return client.post("/jobs", json=body or GOOD, headers={**auth(key), **headers})


# --- auth --------------------------------------------------------------------------------------------------
def test_missing_api_key_says_how_to_get_one(client) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/jobs", json=GOOD)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "missing_api_key"
    assert "Authorization: Bearer" in err["message"] and "hipp api-key create" in err["message"]


@pytest.mark.parametrize("key", ["hipp_nope_nope", "not-a-key", "hipp__x"])
def test_wrong_api_key_is_401(client, key: str) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/jobs", headers=auth(key))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_x_api_key_header_works(client, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/jobs", headers={"X-API-Key": tenant_key}).status_code == 200


# --- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preference", "fragment"),
    [
        ({"utility": -1, "compression": 1}, "utility must be >= 0"),
        ({"utility": 0, "robustness": 0, "compression": 0}, "all zero"),
        ({"utility": 1, "speed": 1}, "unknown preference key(s) ['speed']"),
        ({"utility": "a lot"}, "preference.utility"),
        ({"utility": 1e308, "compression": 1e308}, "too large"),
    ],
)
def test_bad_preference_is_422_with_what_to_fix(client, tenant_key, preference, fragment) -> None:  # type: ignore[no-untyped-def]
    r = submit(client, tenant_key, {"model": "tiny-llava", "preference": preference})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert fragment in err["message"], err["message"]


def test_nan_preference_is_rejected(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    body = b'{"model": "tiny-llava", "preference": {"utility": NaN, "compression": 1}}'
    r = client.post("/jobs", content=body, headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert r.status_code == 422
    assert "finite" in r.json()["error"]["message"]


def test_preference_is_normalized(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = submit(client, tenant_key, {"model": "tiny-llava", "preference": {"utility": 2, "compression": 2}})
    assert r.status_code == 201, r.text
    assert r.json()["preference"] == {"utility": 0.5, "robustness": 0.0, "compression": 0.5}


def test_unknown_model_is_422_and_lists_options(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = submit(client, tenant_key, {**GOOD, "model": "/etc/passwd"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "unknown_model"
    assert "tiny-llava" in err["message"] and "/etc/passwd" in err["message"]
    r = submit(client, tenant_key, {**GOOD, "model": "some-org/some-model"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_model"


def test_unknown_field_and_out_of_range_are_named(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = submit(client, tenant_key, {**GOOD, "sparsity": 0.5})
    assert r.status_code == 422 and "sparsity" in r.json()["error"]["message"]
    r = submit(client, tenant_key, {**GOOD, "target_sparsity": 1.5})
    assert r.status_code == 422 and "target_sparsity" in r.json()["error"]["message"]


def test_oversized_body_is_413(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    body = {**GOOD, "metadata": {"blob": "x" * (stack_settings.max_body_bytes + 10)}}
    r = submit(client, tenant_key, body)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "body_too_large" and str(stack_settings.max_body_bytes) in err["message"]


def test_malformed_json_and_unknown_route_use_the_error_shape(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/jobs", content=b"{", headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message", "detail"}
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"



def test_each_app_has_its_own_runtime_and_closes_it_at_shutdown(stack_settings: Settings, tenant_key: str) -> None:
    """No state shared between two apps of one process (database pool, key cache, dispatcher); at shutdown
    an app publishes what its dispatcher holds and stops it."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.security import hash_key

    with TestClient(create_app(stack_settings)) as a, TestClient(create_app(stack_settings)) as b:
        ra, rb = a.app.state.runtime, b.app.state.runtime
        assert ra.db.engine is not rb.db.engine and ra.broker is not rb.broker
        assert a.get("/jobs", headers=auth(tenant_key)).status_code == 200
        assert ra.keys.get(hash_key(tenant_key)) is not None and rb.keys.get(hash_key(tenant_key)) is None
        job_id = submit(a, tenant_key).json()["id"]
        dispatcher = ra.dispatcher
    assert not dispatcher.thread.is_alive()
    with session_scope(stack_settings.resolved_database_url) as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None and job.enqueued_at is not None

# --- jobs --------------------------------------------------------------------------------------------------
def test_submit_commits_then_enqueues(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    r = submit(client, tenant_key)
    assert r.status_code == 201
    job = r.json()
    assert job["status"] == "queued" and job["attempt"] == 0 and r.headers["Location"] == f"/jobs/{job['id']}"
    assert client.app.state.runtime.dispatcher.flush()
    with session_scope(stack_settings.resolved_database_url) as s:
        row = s.get(Job, uuid.UUID(job["id"]))
        assert row is not None and row.enqueued_at is not None
    queued = redis.Redis.from_url(stack_settings.broker_url).lrange(stack_settings.gpu_queue, 0, -1)
    assert any(job["id"] in m.decode() for m in queued)
    events = client.get(f"/jobs/{job['id']}/events", headers=auth(tenant_key)).json()["items"]
    assert [e["message"] for e in events] == ["job enqueued"]


def test_other_tenants_job_is_404(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    from app.security import create_api_key

    job_id = submit(client, tenant_key).json()["id"]
    with session_scope(stack_settings.resolved_database_url) as s:
        other, _ = create_api_key(s, f"other-{uuid.uuid4().hex[:6]}")
    r = client.get(f"/jobs/{job_id}", headers=auth(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/jobs", headers=auth(other)).json()["items"] == []


def test_list_paginates_with_cursor_and_filters_status(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    ids = [submit(client, tenant_key).json()["id"] for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params, headers=auth(tenant_key)).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == ids[::-1]
    r = client.post(f"/jobs/{ids[1]}/cancel", headers=auth(tenant_key))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    page = client.get("/jobs", params={"status": "cancelled"}, headers=auth(tenant_key)).json()
    assert [j["id"] for j in page["items"]] == [ids[1]]
    page = client.get("/jobs", params=[("status", "cancelled"), ("status", "queued")], headers=auth(tenant_key))
    assert len(page.json()["items"]) == 5
    r = client.get("/jobs", params={"status": "done"}, headers=auth(tenant_key))
    assert r.status_code == 422 and "status" in r.json()["error"]["message"]
    r = client.get("/jobs", params={"cursor": "garbage"}, headers=auth(tenant_key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


def test_cancel_finished_job_is_409(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, tenant_key).json()["id"]
    with session_scope(stack_settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status="succeeded"))
    r = client.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"]


def test_idempotency_key(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    first = submit(client, tenant_key, **{"Idempotency-Key": "abc"})
    again = submit(client, tenant_key, **{"Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = submit(client, tenant_key, {**GOOD, "target_sparsity": 0.3}, **{"Idempotency-Key": "abc"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_artifacts_presigned_url_downloads_verified_bytes(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, tenant_key).json()["id"]
    data = b"pretend checkpoint " * 1000
    storage = get_storage(stack_settings)
    obj = storage.put_bytes(f"jobs/{job_id}/checkpoint.tar", data)
    assert obj.sha256 == hashlib.sha256(data).hexdigest()
    with session_scope(stack_settings.resolved_database_url) as s:
        s.add(
            Artifact(
                job_id=uuid.UUID(job_id),
                kind="checkpoint",
                name="checkpoint.tar",
                key=obj.key,
                size=obj.size,
                sha256=obj.sha256,
            )
        )
    arts = client.get(f"/jobs/{job_id}/artifacts", headers=auth(tenant_key)).json()
    assert [a["name"] for a in arts] == ["checkpoint.tar"]
    got = httpx.get(arts[0]["url"])
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == arts[0]["sha256"]
    assert 'filename="checkpoint.tar"' in got.headers["content-disposition"]
    assert "X-Amz-Expires" in arts[0]["url"] and "X-Amz-Signature" in arts[0]["url"]
    r = client.get(f"/jobs/{job_id}/artifacts/checkpoint.tar", headers=auth(tenant_key), follow_redirects=False)
    assert r.status_code == 307 and r.headers["X-Checksum-Sha256"] == obj.sha256
    assert client.get(f"/jobs/{job_id}/plans", headers=auth(tenant_key)).json() == []


def test_local_store_signed_urls_expire_and_resist_tampering(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.storage import LocalStorage

    settings = Settings(
        home=tmp_path, storage="local", signing_secret="s3cret", database_url=f"sqlite:///{tmp_path}/x.db"
    )
    storage = get_storage(settings)
    assert isinstance(storage, LocalStorage)
    storage.put_bytes("jobs/x/a.bin", b"hello")
    with TestClient(create_app(settings)) as c:
        url, _ = storage.signed_url("jobs/x/a.bin", "a.bin", 60, "http://testserver")
        r = c.get(url)
        assert r.status_code == 200 and r.content == b"hello" and "a.bin" in r.headers["content-disposition"]
        assert c.get(url.replace("filename=a.bin", "filename=b.bin")).status_code == 403
        assert c.get(url.replace("jobs/x/a.bin", "jobs/x/b.bin")).status_code == 403
        expired, _ = storage.signed_url("jobs/x/a.bin", "a.bin", -5, "http://testserver")
        r = c.get(expired)
        assert r.status_code == 403 and r.json()["error"]["code"] == "url_expired"


# --- policies, health, metrics -----------------------------------------------------------------------------
def test_policies(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    body = {"name": "p1", "model": "tiny-llava", "metrics": {"hv": 0.7}}
    r = client.post("/policies", json=body, headers=auth(tenant_key))
    assert r.status_code == 201
    pid = r.json()["id"]
    assert client.get(f"/policies/{pid}", headers=auth(tenant_key)).json()["metrics"] == {"hv": 0.7}
    listed = client.get("/policies", params={"model": "tiny-llava"}, headers=auth(tenant_key)).json()
    assert [p["id"] for p in listed] == [pid]
    assert client.get(f"/policies/{uuid.uuid4()}", headers=auth(tenant_key)).status_code == 404


def test_health_ready_metrics_docs(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    client.get("/jobs", headers=auth(tenant_key))
    text = client.get("/metrics").text
    assert 'hipp_http_requests_total{method="GET",route="/jobs",status="200"}' in text
    assert 'hipp_jobs{' not in text  # job counts of all tenants need HIPP_METRICS_TOKEN (test_hardening.py)
    spec = client.get("/openapi.json").json()
    assert {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/events",
        "/jobs/{job_id}/artifacts",
        "/jobs/{job_id}/plans",
        "/policies",
        "/readyz",
    } <= set(spec["paths"])


def test_readyz_reports_a_dead_broker(stack_settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    broken = stack_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "not_ready" and "broker" in err["message"] and err["detail"]["database"] == "ok"
    json.dumps(err)
