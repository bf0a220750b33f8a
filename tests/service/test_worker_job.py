"""A whole job through a real Celery worker process (Redis broker, Postgres, moto S3) on the tiny model:
status and stage progress seen while polling, events listed, checkpoint downloaded through the presigned URL,
its sha256 verified, and loaded in a fresh process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.models import Job
from tests.service.conftest import auth, stack_env
from tests.service.test_datasets import ready_conversations
from worker.cli.jobs import LOAD_SNIPPET
from worker.cli.serve import celery_worker_command

pytestmark = pytest.mark.timeout(300)


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = celery_worker_command(settings.gpu_queue)
    return subprocess.Popen(cmd, env=stack_env(settings), stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def worker_settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Its own queue, so jobs queued by the API tests (no worker there) are not picked up here; policies may
    # be registered from one folder (HIPP_POLICY_DIRS).
    policies = tmp_path_factory.mktemp("policies")
    return stack_settings.model_copy(update={"gpu_queue": f"{stack_settings.gpu_queue}-w", "policy_dirs": [policies]})


@contextmanager
def running_worker(settings: Settings, log_path: Path) -> Iterator[Path]:
    """A GPU-queue worker process for ``settings`` while the block runs; yields its log file."""
    proc = start_worker(settings, log_path)
    try:
        yield log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def api_client(settings: Settings):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def worker(worker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_worker(worker_settings, tmp_path_factory.mktemp("worker") / "worker.log") as log_path:
        yield log_path


@pytest.fixture
def wclient(worker_settings: Settings):  # type: ignore[no-untyped-def]
    with api_client(worker_settings) as c:
        yield c


def poll(client, key: str, job_id: str, timeout: float = 240) -> tuple[dict, list[tuple[str, str | None, float]]]:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, str | None, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
        point = (job["status"], job["stage"], job["progress"])
        if not seen or seen[-1] != point:
            seen.append(point)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, seen
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish; saw {seen}")


def test_full_job_through_a_worker_process(worker, wclient, worker_settings, tenant_key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": "tiny-llava",
        "preference": {"utility": 0.4, "robustness": 0.2, "compression": 0.4},
        "recovery": {"steps": 2, "batch_size": 2},
        "evaluation": {"max_samples": 4, "world": True},  # a tiny model has no benchmarks of its own
        "data": {"recovery": ready_conversations(wclient, worker_settings, tenant_key)},
    }
    r = wclient.post("/jobs", json=body, headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job, seen = poll(wclient, tenant_key, job_id)
    assert job["status"] == "succeeded", (job, worker.read_text()[-3000:])
    # progress was observed while running, stage by stage, and never went backwards
    running = [s for s in seen if s[0] == "running"]
    assert running, seen
    assert len({s[1] for s in running}) >= 2, seen
    progresses = [s[2] for s in seen]
    assert progresses == sorted(progresses) and job["progress"] == 1.0
    assert job["attempt"] == 1 and job["error"] is None
    result = job["result"]
    assert result["plan_source"] == "baseline"
    assert 0.2 < result["chosen_plan"]["sparsity"] < 0.35
    assert {k: v["status"] for k, v in result["stages"].items()} == dict.fromkeys(
        ("load", "sensitivity", "plan", "prune", "recover", "evaluate", "upload"), "done"
    )
    assert result["recovery"]["steps"] == 2 and result["recovery"]["method"] == "lora"
    assert result["recovery"]["data"]["id"] == body["data"]["recovery"]  # type: ignore[index]
    assert result["metrics"]["parameters"] < result["metrics"]["dense_parameters"]
    evaluation = result["metrics"]["evaluation"]
    assert evaluation["scienceqa"]["n"] == 4 and set(evaluation["pope"]) == {"random", "popular", "adversarial"}
    assert "scienceqa" in result["dense"]["metrics"]
    assert evaluation["data"] == result["dense"]["metrics"]["data"] and "synthetic world" in evaluation["data"]
    assert len(result["sensitivity"]["direct"]) > 0

    events = wclient.get(f"/jobs/{job_id}/events", headers=auth(tenant_key)).json()["items"]
    messages = [e["message"] for e in events]
    for stage in ("load", "sensitivity", "plan", "prune", "recover", "evaluate", "upload"):
        assert f"{stage} started" in messages
    assert any(m.startswith("recover finished") for m in messages)
    assert messages[-1] == "job succeeded"
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)

    plans = wclient.get(f"/jobs/{job_id}/plans", headers=auth(tenant_key)).json()
    assert len(plans) == 1 and plans[0]["chosen"]

    arts = {a["name"]: a for a in wclient.get(f"/jobs/{job_id}/artifacts", headers=auth(tenant_key)).json()}
    assert set(arts) == {"checkpoint.tar", "hipp_plan.json", "metrics.json", "hipp_plans.json", "front.png",
                         "allocation.png"}
    ckpt = arts["checkpoint.tar"]
    download = httpx.get(ckpt["url"])
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == ckpt["sha256"] == result["checkpoint"]["sha256"]
    archive = tmp_path / "checkpoint.tar"
    archive.write_bytes(download.content)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET, str(tmp_path / "checkpoint")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["parameters"] == result["metrics"]["parameters"]
    assert loaded["plan"] == result["chosen_plan"]["fingerprint"]


def test_unknown_builtin_fails_without_retry_and_duplicates_are_not_claimed(  # type: ignore[no-untyped-def]
    worker, wclient, tenant_key, worker_settings: Settings
) -> None:
    # The testbed is allowed by the API but may not be installed: then the worker fails the job at once
    # with model_not_found (not retried). If it is installed, point the job at a path that vanished.
    r = wclient.post("/jobs", json={"model": "tiny-llava", "preference": {"utility": 1}}, headers=auth(tenant_key))
    job_id = r.json()["id"]
    with session_scope(worker_settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(model="/nonexistent/model-dir"))
    from app.queue import publish

    publish(worker_settings, uuid.UUID(job_id))  # a second delivery of the same job
    job, _ = poll(wclient, tenant_key, job_id, timeout=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_not_found" and job["error"]["retryable"] is False
    assert "/nonexistent/model-dir" in job["error"]["message"]
    assert job["attempt"] == 1


def test_a_registered_policy_plans_the_job(worker, wclient, tenant_key, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    pytest.importorskip("worker.hipp.policy.search", reason="the engine's policy search is not in this checkout")
    from worker.hipp.models.loading import load_model
    from worker.hipp.policy.network import HippPolicy, PolicyConfig
    from worker.hipp.policy.state import FEATURES
    from worker.hipp.policy.store import model_fingerprint, save_policy

    # An untrained (randomly initialized) policy is still a policy: the job must plan with it.
    torch.manual_seed(0)
    fingerprint = model_fingerprint(load_model("tiny-llava").adapter)
    policy_dir = save_policy(
        HippPolicy(PolicyConfig(num_features=len(FEATURES))),
        wclient.app.state.settings.policy_dirs[0] / "policy",
        {"model_fingerprint": fingerprint, "model_reference": "tiny-llava"},
    )
    body = {"name": "random-init", "model": "tiny-llava", "uri": str(policy_dir)}
    assert wclient.post("/policies", json=body, headers=auth(tenant_key)).status_code == 201
    job_body = {
        "model": "tiny-llava",
        "preference": {"utility": 0.2, "robustness": 0.2, "compression": 0.6},
        "evaluation": {"enabled": False, "max_samples": 4},  # the policy's search still scores plans
    }
    job_id = wclient.post("/jobs", json=job_body, headers=auth(tenant_key)).json()["id"]
    job, _ = poll(wclient, tenant_key, job_id)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["plan_source"] == "policy" and "registered policy" in result["plan_source_detail"]
    plans = wclient.get(f"/jobs/{job_id}/plans", headers=auth(tenant_key)).json()
    chosen = [p for p in plans if p["chosen"]]
    assert len(chosen) == 1 and all(p["source"] == "policy" for p in plans)
    assert chosen[0]["plan"]["fingerprint"] == result["chosen_plan"]["fingerprint"]
    assert {"utility", "robustness", "compression"} <= set(chosen[0]["plan"])
    # every plan of the front is kept in full, in the listed order, so a later job can replay any of them
    arts = {a["name"]: a for a in wclient.get(f"/jobs/{job_id}/artifacts", headers=auth(tenant_key)).json()}
    kept = httpx.get(arts["hipp_plans.json"]["url"]).json()
    assert [p["fingerprint"] for p in kept["plans"]] == [p["plan"]["fingerprint"] for p in plans]
    assert plans[kept["chosen"]]["chosen"]


def test_cancel_a_running_job_stops_it(worker, wclient, worker_settings, tenant_key) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": "tiny-llava",
        "preference": {"utility": 1},
        "recovery": {"steps": 300, "batch_size": 1},  # a minute or more of training
        "evaluation": {"enabled": False},
        "data": {"recovery": ready_conversations(wclient, worker_settings, tenant_key)},
    }
    job_id = wclient.post("/jobs", json=body, headers=auth(tenant_key)).json()["id"]
    deadline = time.monotonic() + 180
    while True:
        job = wclient.get(f"/jobs/{job_id}", headers=auth(tenant_key)).json()
        if job["stage"] == "recover" and job["stage_progress"] > 0:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.2)
    r = wclient.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    asked = time.monotonic()
    job, _ = poll(wclient, tenant_key, job_id, timeout=60)
    assert job["status"] == "cancelled" and time.monotonic() - asked < 30
    messages = [e["message"] for e in wclient.get(f"/jobs/{job_id}/events", headers=auth(tenant_key)).json()["items"]]
    assert "cancelled at the caller's request" in messages and messages[-1] == "job cancelled"
