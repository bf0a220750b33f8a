"""Policy training as a job (POST /policies with ``train``): the request's checks (422s before anything is
queued), then a real Celery worker process (Redis, Postgres, moto S3) training a testbed policy for two GRPO
steps: the job's stages, progress and events, the policy ``ready`` with its artifacts, a later pruning job for
the same model planning with it, and a time budget that stops training early."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import session_factory, session_scope
from app.models import Job, utcnow
from app.reaper import reap_stale
from tests.service.conftest import auth
from tests.service.test_worker_job import api_client, running_worker

pytestmark = pytest.mark.timeout(300)

FINAL = ("succeeded", "failed", "cancelled")
#: Two GRPO steps of one preference x two plans, on 8 search questions per split: seconds per step.
SMALL = {"steps": 2, "group_size": 2, "preferences_per_step": 1, "search_limit": 4, "calibration_samples": 4,
         "seed": 7}


def train_body(**train: Any) -> dict[str, Any]:
    return {"name": "testbed policy", "model": "testbed", "train": {**SMALL, **train}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"group_size": 1}, "group_size"),
        ({"group_size": 65}, "group_size"),
        ({"budget_min": 0.5, "budget_max": 0.4}, "budget_min"),
        ({"budget_max": 0.95}, "budget_max"),
        ({"budget_min": 0.0}, "budget_min"),
        ({"time_budget_s": 0}, "time_budget_s"),
        ({"seed": "1"}, "seed"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_train_options_are_checked(client, tenant_key, change, field) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/policies", json=train_body(**change), headers=auth(tenant_key))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and field in error["message"], error


def test_training_requests_that_cannot_run_are_refused(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/policies", json={**train_body(), "model": "no-such-model"}, headers=auth(tenant_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_model", r.text
    # Not the testbed: its plans must be scored on the tenant's benchmarks.
    r = client.post("/policies", json={**train_body(), "model": "tiny-llava"}, headers=auth(tenant_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "search_needs_data", r.text
    r = client.post("/policies", json={**train_body(), "uri": "abc"}, headers=auth(tenant_key))
    assert r.status_code == 422 and "uri" in r.json()["error"]["message"], r.text
    missing = "00000000-0000-0000-0000-000000000000"
    r = client.post("/policies", json=train_body(search={"pope": missing}), headers=auth(tenant_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_data_reference", r.text
    assert "train.search.pope" in r.json()["error"]["message"]
    # Nothing was queued or registered.
    assert client.get("/policies", headers=auth(tenant_key)).json() == []
    assert client.get("/jobs", headers=auth(tenant_key)).json()["items"] == []


def test_a_queued_training_is_listed_and_cancelled_with_its_policy(client, tenant_key) -> None:  # type: ignore[no-untyped-def]
    """No worker consumes this session's plain GPU queue: the job stays queued, and its cancel ends both."""
    r = client.post("/policies", json=train_body(), headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    policy = r.json()
    assert policy["status"] == "training" and policy["uri"] is None and policy["train"]["steps"] == 2
    job = client.get(f"/jobs/{policy['job_id']}", headers=auth(tenant_key)).json()
    assert job["kind"] == "train_policy" and job["status"] == "queued" and job["model"] == "testbed"
    listed = client.get("/policies", params={"status": "training"}, headers=auth(tenant_key)).json()
    assert [p["id"] for p in listed] == [policy["id"]]
    r = client.post(f"/jobs/{policy['job_id']}/cancel", headers=auth(tenant_key))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    after = client.get(f"/policies/{policy['id']}", headers=auth(tenant_key)).json()
    assert after["status"] == "cancelled" and after["uri"] is None


def test_a_training_whose_worker_keeps_dying_fails_with_its_policy(client, tenant_key, stack_settings) -> None:  # type: ignore[no-untyped-def]
    """The reaper fails a job whose last attempt's worker stopped heartbeating; its policy fails with it."""
    policy = client.post("/policies", json=train_body(), headers=auth(tenant_key)).json()
    past = utcnow() - timedelta(seconds=60)
    with session_scope(stack_settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(policy["job_id"])).values(
            status="running", attempt=Job.max_attempts, lease_owner="dead-worker", lease_expires_at=past,
            heartbeat_at=past))
    reaped = reap_stale(stack_settings, session_factory(stack_settings.resolved_database_url))
    assert uuid.UUID(policy["job_id"]) in reaped.failed
    job = client.get(f"/jobs/{policy['job_id']}", headers=auth(tenant_key)).json()
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted"
    after = client.get(f"/policies/{policy['id']}", headers=auth(tenant_key)).json()
    assert after["status"] == "failed" and after["uri"] is None


@pytest.fixture(scope="module")
def train_settings(stack_settings: Settings) -> Settings:
    return stack_settings.model_copy(update={"gpu_queue": f"{stack_settings.gpu_queue}-train"})


@pytest.fixture(scope="module")
def train_worker(train_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_worker(train_settings, tmp_path_factory.mktemp("train-worker") / "worker.log") as log_path:
        yield log_path


@pytest.fixture
def tclient(train_settings: Settings):  # type: ignore[no-untyped-def]
    with api_client(train_settings) as c:
        yield c


def wait_job(client: Any, key: str, job_id: str, timeout: float = 180) -> tuple[dict[str, Any], list[Any]]:
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", params={"wait": 2}, headers=auth(key)).json()
        point = (job["status"], job["stage"], job["progress"])
        if not seen or seen[-1] != point:
            seen.append(point)
        if job["status"] in FINAL:
            return job, seen
    raise AssertionError(f"job {job_id} did not finish; saw {seen}")


def test_train_a_policy_through_a_worker_and_prune_with_it(train_worker, tclient, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = tclient.post("/policies", json=train_body(), headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    policy = r.json()
    job, seen = wait_job(tclient, tenant_key, policy["job_id"])
    assert job["status"] == "succeeded", (job["error"], train_worker.read_text()[-3000:])
    assert job["kind"] == "train_policy" and job["progress"] == 1.0 and job["attempt"] == 1
    assert [p[2] for p in seen] == sorted(p[2] for p in seen)  # progress never went backwards
    result = job["result"]
    assert {k: v["status"] for k, v in result["stages"].items()} == dict.fromkeys(
        ("load", "search_setup", "train", "register"), "done")
    training = result["training"]
    assert training["steps"] == training["steps_asked"] == 2 and training["stopped_by"] is None
    assert training["plan_evaluations"] == 4 and len(training["learning_curve"]) == 2
    assert result["search"]["data"] == "synthetic world search split" and result["search"]["questions"] > 0

    messages = [e["message"] for e in tclient.get(f"/jobs/{job['id']}/events", params={"limit": 1000},
                                                  headers=auth(tenant_key)).json()["items"]]
    for stage in ("load", "search_setup", "train", "register"):
        assert f"{stage} started" in messages, messages
    assert messages[-1] == "job succeeded"

    ready = tclient.get(f"/policies/{policy['id']}", headers=auth(tenant_key)).json()
    assert ready["status"] == "ready" and ready["uri"] == f"store:policies/{policy['id']}"
    assert ready["fingerprint"] == result["search"]["fingerprint"]
    assert ready["metrics"]["steps"] == 2 and ready["metrics"]["final_return"] == training["final_return"]
    arts = {a["name"]: a for a in tclient.get(f"/jobs/{job['id']}/artifacts", headers=auth(tenant_key)).json()}
    assert set(arts) == {"policy.safetensors", "policy.json", "state.json", "learning_curve.png"}
    meta = httpx.get(arts["policy.json"]["url"])
    assert hashlib.sha256(meta.content).hexdigest() == arts["policy.json"]["sha256"]
    assert json.loads(meta.content)["training"]["steps"] == 2

    # A pruning job for the same model plans with the trained policy (the tenant's newest ready one).
    r = tclient.post("/jobs", json={"model": "testbed", "preference": {"utility": 0.5, "compression": 0.5},
                                    "evaluation": {"enabled": False}, "calibration": {"samples": 4},
                                    "export": {"dtype": "float32"}}, headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    pruned, _ = wait_job(tclient, tenant_key, r.json()["id"])
    assert pruned["status"] == "succeeded", (pruned["error"], train_worker.read_text()[-3000:])
    assert pruned["result"]["plan_source"] == "policy"
    assert pruned["result"]["plan_source_detail"] == f"trained policy {policy['id']} (testbed policy)"


def test_the_time_budget_stops_training_at_a_step_boundary(train_worker, tclient, tenant_key) -> None:  # type: ignore[no-untyped-def]
    r = tclient.post("/policies", json=train_body(steps=1000, time_budget_s=0.001), headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    policy = r.json()
    job, _ = wait_job(tclient, tenant_key, policy["job_id"])
    assert job["status"] == "succeeded", (job["error"], train_worker.read_text()[-3000:])
    training = job["result"]["training"]
    assert training["steps"] == 1 and training["steps_asked"] == 1000 and training["stopped_by"] == "time_budget"
    ready = tclient.get(f"/policies/{policy['id']}", headers=auth(tenant_key)).json()
    assert ready["status"] == "ready" and ready["metrics"]["steps"] == 1
    assert ready["metrics"]["stopped_by"] == "time_budget"


def test_cli_trains_a_policy_and_lists_it(train_worker, train_settings, tenant_key, capsys) -> None:  # type: ignore[no-untyped-def]
    """``hipp policies train --wait`` through the light client over HTTP, with its progress line, then ``list``
    and ``show``."""
    from tests.service.conftest import free_port
    from tests.service.test_client import serving
    from worker.cli import main

    with serving(train_settings, free_port()) as url:
        service = ["policies", "--url", url, "--key", tenant_key]
        code = main([*service, "train", "--model", "testbed", "--name", "cli policy", "--steps", "2",
                     "--group-size", "2", "--preferences-per-step", "1", "--search-limit", "4",
                     "--calibration-samples", "4", "--seed", "3", "--wait", "--timeout", "150"])
        out, err = capsys.readouterr()
        assert code == 0, (out, err, train_worker.read_text()[-3000:])
        assert "succeeded" in err and "100.0%" in err  # the progress line
        trained = json.loads(out[out.index("{"):])
        assert trained["status"] == "ready" and trained["metrics"]["steps"] == 2
        assert main([*service, "list", "--status", "ready"]) == 0
        listed = capsys.readouterr().out
        assert trained["id"] in listed and "2 steps" in listed and "cli policy" in listed
        assert main([*service, "show", trained["id"]]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["uri"] == f"store:policies/{trained['id']}" and shown["train"]["seed"] == 3
