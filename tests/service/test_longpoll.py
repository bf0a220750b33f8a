"""Long-polling ``GET /jobs/{id}?wait=S`` (Postgres): it answers when the job changes, or when S runs out; S is
bounded and validated; ETag / If-None-Match name the state a client has; the light client's ``wait`` (behind
``hipp jobs wait``) uses it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.models import Job, utcnow
from hipp_client import HippClient
from tests.service.conftest import auth

pytestmark = pytest.mark.timeout(120)
BODY = {"model": "tiny-llava", "preference": {"utility": 1.0}}


def _submit(client, key: str) -> dict:  # type: ignore[no-untyped-def]
    r = client.post("/jobs", json=BODY, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _set(settings: Settings, job_id: str, **values: object) -> None:
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(**values))


def _later(delay: float, fn, *args, **kw) -> threading.Thread:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args, **kw)), daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("wait", ["-1", "61", "abc", "nan", "inf"])
def test_wait_out_of_bounds_is_422_naming_the_limit(client, tenant_key, wait: str) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key)
    r = client.get(f"/jobs/{job['id']}", params={"wait": wait}, headers=auth(tenant_key))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and "wait" in err["message"]
    if wait in ("-1", "61", "nan", "inf"):
        assert "60" in err["message"]


def test_etag_and_if_none_match(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key)
    r = client.get(f"/jobs/{job['id']}", headers=auth(tenant_key))
    tag = r.headers["ETag"]
    assert r.status_code == 200 and tag.startswith('W/"')
    r = client.get(f"/jobs/{job['id']}", headers={**auth(tenant_key), "If-None-Match": tag})
    assert r.status_code == 304 and r.headers["ETag"] == tag
    # A heartbeat is not a change; progress is.
    _set(stack_settings, job["id"], heartbeat_at=utcnow())
    assert client.get(f"/jobs/{job['id']}", headers={**auth(tenant_key), "If-None-Match": tag}).status_code == 304
    _set(stack_settings, job["id"], progress=0.25)
    r = client.get(f"/jobs/{job['id']}", headers={**auth(tenant_key), "If-None-Match": tag})
    assert r.status_code == 200 and r.json()["progress"] == 0.25 and r.headers["ETag"] != tag


def test_long_poll_answers_when_the_job_changes(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key)
    tag = client.get(f"/jobs/{job['id']}", headers=auth(tenant_key)).headers["ETag"]
    _later(1.0, _set, stack_settings, job["id"], status="running", stage="load", progress=0.05)
    t0 = time.monotonic()
    r = client.get(f"/jobs/{job['id']}", params={"wait": 30}, headers={**auth(tenant_key), "If-None-Match": tag})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["stage"]) == ("running", "load")
    assert time.monotonic() - t0 < 25, "the change did not end the wait"


def test_long_poll_without_a_change_ends_after_wait(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key)
    r = client.get(f"/jobs/{job['id']}", params={"wait": 1}, headers=auth(tenant_key))
    assert r.status_code == 200 and r.json()["status"] == "queued"
    tag = r.headers["ETag"]
    r = client.get(f"/jobs/{job['id']}", params={"wait": 1}, headers={**auth(tenant_key), "If-None-Match": tag})
    assert r.status_code == 304


def test_long_poll_of_a_stale_etag_or_finished_job_answers_at_once(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key)
    t0 = time.monotonic()
    r = client.get(f"/jobs/{job['id']}", params={"wait": 60}, headers={**auth(tenant_key), "If-None-Match": 'W/"x"'})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert client.post(f"/jobs/{job['id']}/cancel", headers=auth(tenant_key)).json()["status"] == "cancelled"
    r = client.get(f"/jobs/{job['id']}", params={"wait": 60}, headers=auth(tenant_key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert time.monotonic() - t0 < 30, "a long-poll waited although it had something to answer"


def test_long_poll_of_another_tenants_job_is_404(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    from app.security import create_api_key

    job = _submit(client, tenant_key)
    with session_scope(stack_settings.resolved_database_url) as s:
        other, _ = create_api_key(s, f"other-{uuid.uuid4().hex[:8]}")
    r = client.get(f"/jobs/{job['id']}", params={"wait": 30}, headers=auth(other))
    assert r.status_code == 404


def test_the_cli_client_waits_with_long_polls(client, tenant_key, stack_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job = _submit(client, tenant_key)
    requests: list[str] = []
    client.event_hooks["request"] = [lambda req: requests.append(str(req.url))]
    cli = HippClient(api_key=tenant_key, http=client)  # the TestClient is an httpx.Client

    def finish() -> None:
        _set(stack_settings, job["id"], status="running", stage="load", progress=0.1)
        time.sleep(1.0)
        _set(stack_settings, job["id"], status="succeeded", stage="upload", progress=1.0)

    _later(0.5, finish)
    done = cli.wait(job["id"], timeout=60)
    assert done.status == "succeeded"
    assert any("wait=" in u for u in requests), requests
    # One request per change (plus the first), not one per half second.
    assert len(requests) <= 6, requests
