"""Hardening, round two (issue 18), the worker's side, run in-process against Postgres + S3 (moto): hub-style
names never reach local folders, policy uris cannot probe the filesystem, job errors and events show no server
paths or tracebacks, and a cancel during load wins over the load failing."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db import session_factory, session_scope
from app.models import Event, Job, JobStatus, Policy
from tests.service.conftest import auth

GOOD: dict[str, Any] = {
    "model": "tiny-llava",
    "preference": {"utility": 1.0},
    "evaluation": {"enabled": False, "max_samples": 4},
}


@pytest.fixture
def hub_settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    policies = tmp_path / "policies"
    (policies / "mine").mkdir(parents=True)
    return stack_settings.model_copy(
        update={
            "allow_hub_models": True,
            "max_attempts": 1,
            "policy_dirs": [policies],
            "gpu_queue": f"{stack_settings.gpu_queue}-hw",  # nobody consumes it: the jobs run in-process here
            "home": tmp_path / "home",
        }
    )


@pytest.fixture
def api(hub_settings: Settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(hub_settings)) as c:
        yield c


def events_of(settings: Settings, job_id: str) -> list[Event]:
    with session_scope(settings.resolved_database_url) as s:
        return list(s.scalars(select(Event).where(Event.job_id == uuid.UUID(job_id)).order_by(Event.id)))


def job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


# --- 5. hub-style names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["tmp/..", "out/..", "./x", "a/.hidden", "../etc", "org/name.", ".org/name"])
def test_hub_ids_that_name_folders_are_422(api, tenant_key: str, ref: str) -> None:  # type: ignore[no-untyped-def]
    r = api.post("/jobs", json={**GOOD, "model": ref}, headers=auth(tenant_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_model", r.text


def test_a_hub_id_is_never_loaded_from_a_local_folder(
    api, tenant_key: str, hub_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    from worker.pipeline import run_job

    # A folder named like the hub id, relative to the worker's directory, holding a model config.
    workdir = tmp_path / "cwd"
    (workdir / "out" / "checkpoint").mkdir(parents=True)
    (workdir / "out" / "checkpoint" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = api.post("/jobs", json={**GOOD, "model": "out/checkpoint"}, headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert run_job(job_id, hub_settings) == "failed"
    job = job_row(hub_settings, job_id)
    assert job.error is not None and job.error["code"] == "model_not_found", job.error
    assert str(workdir) not in job.error["message"] and "/tmp" not in job.error["message"], job.error
    for e in events_of(hub_settings, job_id):
        assert str(tmp_path) not in e.message + json.dumps(e.data), e.message
    assert os.getcwd() == str(workdir)  # the load ran elsewhere and came back


# --- 6. policy uris ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["/etc", "/root/.ssh", "../x", "~/.ssh", "/tmp", "a/b", "..", "x y"])
def test_policy_uri_outside_the_allowed_folders_is_422(api, tenant_key: str, uri: str) -> None:  # type: ignore[no-untyped-def]
    r = api.post("/policies", json={"name": "p", "model": "tiny-llava", "uri": uri}, headers=auth(tenant_key))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_policy_uri" and "fingerprint" in err["message"]


def test_policy_uri_forms_that_are_allowed(api, tenant_key: str, hub_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    inside = str(hub_settings.policy_dirs[0] / "mine")
    for uri in ("3f2a9c0d", "policy-id_1", inside):
        r = api.post("/policies", json={"name": "p", "model": "tiny-llava", "uri": uri}, headers=auth(tenant_key))
        assert r.status_code == 201, r.text
    escape = str(hub_settings.policy_dirs[0] / "mine" / ".." / ".." / "elsewhere")
    r = api.post("/policies", json={"name": "p", "model": "tiny-llava", "uri": escape}, headers=auth(tenant_key))
    assert r.status_code == 422


def test_a_stored_policy_uri_outside_the_folders_is_not_probed(
    api, tenant_key: str, hub_settings: Settings  # type: ignore[no-untyped-def]
) -> None:
    """A row from before the check (uri /etc): the worker neither looks there nor reports what it found."""
    from worker.hipp.models.loading import load_model
    from worker.pipeline.context import JobContext
    from worker.pipeline.run import JobRun, claim
    from worker.pipeline.stages import trained_policy

    job_id = api.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    job = job_row(hub_settings, job_id)
    with session_scope(hub_settings.resolved_database_url) as s:
        s.add(Policy(tenant_id=job.tenant_id, name="legacy", model="tiny-llava", uri="/etc", metrics={}, meta={}))
    factory = session_factory(hub_settings.resolved_database_url)
    claimed = claim(factory, job.id, "test-owner", 60)
    assert claimed is not None
    run = JobRun(factory, claimed, "test-owner", hub_settings)
    from app.storage import get_storage

    ctx = JobContext(job=claimed, run=run, settings=hub_settings, storage=get_storage(hub_settings), work_dir=Path("."))
    ctx.loaded = load_model("tiny-llava")
    trained_policy(ctx)
    messages = [e.message + json.dumps(e.data) for e in events_of(hub_settings, job_id)]
    assert not any("/etc" in m for m in messages), messages
    assert any("not allowed" in m for m in messages), messages


# --- 14. tracebacks stay in the log; a cancel during load wins ---------------------------------------------
def test_worker_errors_show_no_traceback_or_server_path(
    api, tenant_key: str, hub_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    from worker.pipeline import run_job
    from worker.pipeline.stages import STAGE_FUNCS

    def broken_load(ctx: Any) -> Any:
        raise RuntimeError("cannot open /srv/hipp/secret/weights.bin: disk on fire")

    monkeypatch.setitem(STAGE_FUNCS, "load", broken_load)
    job_id = api.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    with caplog.at_level("ERROR", logger="hipp.pipeline"):
        assert run_job(job_id, hub_settings) == "failed"
    job = job_row(hub_settings, job_id)
    assert job.error is not None and "/srv/hipp" not in job.error["message"] and "<server path>" in job.error["message"]
    for e in events_of(hub_settings, job_id):
        text = e.message + json.dumps(e.data)
        assert "Traceback" not in text and "/srv/hipp" not in text and "traceback" not in e.data, text
    # ... and the traceback is in the worker's log instead
    assert any(r.exc_info and "disk on fire" in str(r.exc_info[1]) for r in caplog.records)


def test_cancel_during_load_then_a_load_failure_ends_cancelled(
    api, tenant_key: str, hub_settings: Settings, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    from worker.pipeline import run_job
    from worker.pipeline.stages import STAGE_FUNCS

    settings = hub_settings.model_copy(update={"max_attempts": 3})
    job_id = api.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]

    def cancelled_then_broken(ctx: Any) -> Any:
        assert api.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key)).json()["status"] == "cancelling"
        raise RuntimeError("the load failed after the cancel")

    monkeypatch.setitem(STAGE_FUNCS, "load", cancelled_then_broken)
    assert run_job(job_id, settings) == "cancelled"
    job = job_row(settings, job_id)
    assert job.status == JobStatus.cancelled.value and job.attempt == 1


# --- 7. stage outputs are deleted when a job ends -----------------------------------------------------------
@pytest.mark.parametrize("ending", ["succeeded", "cancelled", "reaped"])
def test_stage_outputs_are_deleted_when_the_job_ends(api, tenant_key: str, hub_settings: Settings, ending: str) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from app.models import utcnow
    from app.reaper import reap_stale
    from app.storage import get_storage
    from worker.pipeline.run import JobRun, claim
    from worker.pipeline.runner import finish

    job_id = api.post("/jobs", json=GOOD, headers=auth(tenant_key)).json()["id"]
    storage = get_storage(hub_settings)
    key = f"jobs/{job_id}/stages/prune.safetensors"
    storage.put_bytes(key, b"weights")
    factory = session_factory(hub_settings.resolved_database_url)
    job = claim(factory, uuid.UUID(job_id), "owner", 60)
    assert job is not None
    run = JobRun(factory, job, "owner", hub_settings)
    run.save_stage_output("weights", key)
    if ending == "reaped":  # the worker died on its last attempt: the reaper fails the job
        with session_scope(hub_settings.resolved_database_url) as s:
            s.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=utcnow() - timedelta(seconds=5)))
        assert job.id in reap_stale(hub_settings, factory).failed
    else:
        assert finish(run, JobStatus(ending)) == ending
    assert not storage.exists(key)
    assert job_row(hub_settings, job_id).stage_outputs == {}
