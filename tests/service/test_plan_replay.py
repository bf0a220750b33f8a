"""Cheap iteration (issue 17, item 5), run in-process against Postgres + S3 (moto): every job keeps its plans in
full (``hipp_plans.json``) and two PNGs (the front, the chosen plan's allocation) next to its checkpoint; a new
job with ``plan: {job, index}`` materializes that plan without searching (no sensitivity, no planner), and the
API refuses references that cannot be replayed, each with a message that says what to fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db import session_scope
from app.models import Event, Job
from app.security import create_api_key
from tests.service.conftest import app_client, auth, in_process_settings

pytestmark = pytest.mark.timeout(300)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY: dict[str, Any] = {  # the cheapest job there is: no evaluation, few calibration images
    "model": "tiny-llava",
    "evaluation": {"enabled": False},
    "calibration": {"samples": 4, "sensitivity_samples": 2},
}


@pytest.fixture(scope="module")
def replay_settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return in_process_settings(stack_settings, tmp_path_factory.mktemp("replay-home"), "pr")


@pytest.fixture(scope="module")
def api(replay_settings: Settings) -> Iterator[Any]:
    with app_client(replay_settings) as c:
        yield c


@pytest.fixture(scope="module")
def owner_key(replay_settings: Settings) -> str:
    with session_scope(replay_settings.resolved_database_url) as session:
        key, _ = create_api_key(session, f"replay-{uuid.uuid4().hex[:8]}", "test")
    return key


def run_to_end(api: Any, key: str, body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from worker.pipeline import run_job

    r = api.post("/jobs", json=body, headers=auth(key))
    assert r.status_code == 201, r.text
    assert run_job(r.json()["id"], settings) in ("succeeded", "failed")
    return dict(api.get(f"/jobs/{r.json()['id']}", headers=auth(key)).json())


@pytest.fixture(scope="module")
def first_job(api: Any, owner_key: str, replay_settings: Settings) -> dict[str, Any]:
    job = run_to_end(api, owner_key, {**TINY, "preference": {"utility": 0.3, "compression": 0.7}}, replay_settings)
    assert job["status"] == "succeeded", job["error"]
    return job


def messages_of(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.resolved_database_url) as s:
        return [e.message for e in s.scalars(select(Event).where(Event.job_id == uuid.UUID(job_id)))]


def artifacts(api: Any, key: str, job_id: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()}


def download(artifact: dict[str, Any]) -> bytes:
    import hashlib

    response = httpx.get(artifact["url"])
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    return response.content


def test_every_job_keeps_its_plans_and_two_plots(api: Any, owner_key: str, first_job: dict[str, Any]) -> None:
    arts = artifacts(api, owner_key, first_job["id"])
    assert {"checkpoint.tar", "hipp_plan.json", "metrics.json", "hipp_plans.json", "front.png",
            "allocation.png"} <= set(arts)
    for name in ("front.png", "allocation.png"):
        assert arts[name]["content_type"] == "image/png" and arts[name]["size"] > 5_000, arts[name]
        assert download(arts[name]).startswith(PNG_SIGNATURE)
    kept = json.loads(download(arts["hipp_plans.json"]))
    listed = api.get(f"/jobs/{first_job['id']}/plans", headers=auth(owner_key)).json()
    assert [p["fingerprint"] for p in kept["plans"]] == [p["plan"]["fingerprint"] for p in listed]
    assert listed[kept["chosen"]]["chosen"] and kept["plans"][kept["chosen"]]["layers"]


def test_a_job_replays_a_plan_of_an_earlier_job_without_searching(
    api: Any, owner_key: str, first_job: dict[str, Any], replay_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.pipeline import run_job
    from worker.pipeline.stages import STAGE_FUNCS

    plans = api.get(f"/jobs/{first_job['id']}/plans", headers=auth(owner_key)).json()
    index = len(plans) - 1
    r = api.post("/jobs", json={**TINY, "plan": {"job": first_job["id"], "index": index}}, headers=auth(owner_key))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    # The first attempt dies at upload: the second resumes there from the saved (replayed) plan and its front.
    with session_scope(replay_settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(max_attempts=2))
    upload = STAGE_FUNCS["upload"]

    def upload_dies(ctx: Any) -> Any:
        raise RuntimeError("worker lost its disk")

    monkeypatch.setitem(STAGE_FUNCS, "upload", upload_dies)
    assert run_job(job_id, replay_settings) == "requeued"
    monkeypatch.setitem(STAGE_FUNCS, "upload", upload)
    assert run_job(job_id, replay_settings) == "succeeded"
    job = api.get(f"/jobs/{job_id}", headers=auth(owner_key)).json()
    assert job["result"]["stages"]["plan"]["attempt"] == 1 and job["result"]["stages"]["upload"]["attempt"] == 2
    result = job["result"]
    fingerprint = plans[index]["plan"]["fingerprint"]
    assert result["chosen_plan"]["fingerprint"] == fingerprint
    assert result["replayed_from"] == {"job": first_job["id"], "index": index, "fingerprint": fingerprint}
    assert result["plan_source"] == "replay"
    assert f"plan {index} of job {first_job['id']}" in result["plan_source_detail"]
    assert job["preference"] == first_job["preference"]  # recorded from the plan's job when none is given
    assert job["options"]["plan"] == result["replayed_from"]
    # no search: sensitivity skipped, the planner never ran (it logs its target sparsity), the replay said so
    assert result["stages"]["sensitivity"]["status"] == "skipped"
    messages = messages_of(replay_settings, job["id"])
    assert f"replayed plan {index} of job {first_job['id']} (no search)" in messages
    assert not any(m.startswith("target sparsity") for m in messages), messages
    assert any(m.startswith("target sparsity") for m in messages_of(replay_settings, first_job["id"]))
    arts = artifacts(api, owner_key, job["id"])
    assert {"front.png", "allocation.png"} <= set(arts)
    assert [p["fingerprint"] for p in json.loads(download(arts["hipp_plans.json"]))["plans"]] == [fingerprint]


def refusal(api: Any, key: str, body: dict[str, Any], status: int, code: str) -> str:
    r = api.post("/jobs", json=body, headers=auth(key))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def test_references_that_cannot_be_replayed_are_refused(
    api: Any, owner_key: str, tenant_key: str, first_job: dict[str, Any]
) -> None:
    first = first_job["id"]
    plans = api.get(f"/jobs/{first}/plans", headers=auth(owner_key)).json()
    missing = str(uuid.uuid4())
    unknown = refusal(api, owner_key, {**TINY, "plan": {"job": missing, "index": 0}}, 422, "invalid_plan_reference")
    assert missing in unknown and "GET /jobs?status=succeeded" in unknown
    # another tenant's job: the same answer as a job that does not exist
    other = refusal(api, tenant_key, {**TINY, "plan": {"job": first, "index": 0}}, 422, "invalid_plan_reference")
    assert other == unknown.replace(missing, first)

    message = refusal(api, owner_key, {**TINY, "plan": {"job": first, "index": len(plans)}}, 422,
                      "invalid_plan_reference")
    assert f"index must be 0 to {len(plans) - 1}" in message
    message = refusal(api, owner_key, {**TINY, "model": "tiny-qwen2-vl", "plan": {"job": first, "index": 0}}, 422,
                      "invalid_plan_reference")
    assert "'tiny-llava'" in message and "same model" in message

    queued = api.post("/jobs", json={**TINY, "preference": {"utility": 1}}, headers=auth(owner_key)).json()["id"]
    message = refusal(api, owner_key, {**TINY, "plan": {"job": queued, "index": 0}}, 409, "plan_job_not_succeeded")
    assert "is queued" in message and "wait until it has succeeded" in message

    # the body itself: a preference or a plan is needed, and a plan fixes the sparsity
    assert "preference: required" in refusal(api, owner_key, TINY, 422, "invalid_request")
    message = refusal(api, owner_key, {**TINY, "target_sparsity": 0.3, "plan": {"job": first, "index": 0}}, 422,
                      "invalid_request")
    assert "target_sparsity: not used with plan" in message
    refusal(api, owner_key, {**TINY, "plan": {"job": first, "index": -1}}, 422, "invalid_request")


def test_plots_draw_without_measurements(tmp_path: Path) -> None:
    """A job with evaluation off still gets both pictures (the front shows sparsities only)."""
    from worker.hipp.models.loading import load_model
    from worker.hipp.pruning.planner import build_plan

    loaded = load_model("tiny-llava")
    plan = build_plan(loaded, 0.3, criterion="magnitude", allocation="uniform")
    from worker.hipp.job import plot_plans

    considered = [{"chosen": True, "plan": {"sparsity": plan.sparsity}, "metrics": {}},
                  {"chosen": False, "plan": {"sparsity": 0.5},
                   "metrics": {"scienceqa": {"accuracy": 0.4}, "pope": {"random": {"balanced_accuracy": 0.6}}}}]
    paths = plot_plans(plan, considered, tmp_path)
    for path in paths.values():
        assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 5_000


def test_cli_submits_a_replay_with_from_plan(
    api: Any, owner_key: str, first_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fastapi.testclient import TestClient

    from hipp_client import HippClient
    from worker.cli import jobs as cli
    from worker.cli import main

    def through_the_app(args: Any) -> HippClient:  # the real client, its HTTP calls answered by the app here
        return HippClient(args.url, args.key, http=TestClient(api.app, headers=auth(args.key or "")))

    monkeypatch.setattr(cli, "_client", through_the_app)
    submit = ["jobs", "--key", owner_key, "submit", "--model", "tiny-llava", "--no-eval"]
    assert main([*submit, "--from-plan", f"{first_job['id']}:0"]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    job = api.get(f"/jobs/{job_id}", headers=auth(owner_key)).json()
    assert job["options"]["plan"]["job"] == first_job["id"] and job["options"]["plan"]["index"] == 0
    assert job["preference"] == first_job["preference"]
    api.post(f"/jobs/{job_id}/cancel", headers=auth(owner_key))

    assert main(submit) == 2
    assert "give --preference (or --from-plan JOB:INDEX" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*submit, "--from-plan", first_job["id"]])
    assert "expected JOB_ID:INDEX" in capsys.readouterr().err
