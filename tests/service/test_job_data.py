"""Jobs name their data (issue 17, item 2), run in-process against Postgres + S3 (moto): a tiny-llava job
calibrates on the tenant's images, is evaluated (dense and pruned) on its POPE and ScienceQA files, recovers on
its conversations, and every metrics dict names the data set (id and SHA-256) it was measured on. The API
refuses a reference it cannot use with a message that says what to fix; a model other than the testbed without
evaluation data evaluates nothing and says so; a data set a queued job names cannot be deleted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.config import Settings
from app.db import session_scope
from app.security import create_api_key
from tests.service.conftest import app_client, auth, in_process_settings
from tests.service.test_datasets import (
    conversations_files,
    create,
    images_files,
    pope_files,
    scienceqa_files,
    tar_bytes,
    validated,
    zip_bytes,
)

pytestmark = pytest.mark.timeout(300)

CHEAP: dict[str, Any] = {  # few calibration images, small evaluation
    "model": "tiny-llava",
    "preference": {"utility": 0.5, "compression": 0.5},
    "calibration": {"samples": 3, "sensitivity_samples": 2},
}
POPE_QUESTIONS = {"random": 4, "popular": 4, "adversarial": 4}  # what pope_files() holds per split
SQA_TEST_PROBLEMS = 1  # scienceqa_files(): problems 1 and 3 are in test, only 1 has an image


@pytest.fixture(scope="module")
def data_settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return in_process_settings(stack_settings, tmp_path_factory.mktemp("job-data-home"), "jd")


@pytest.fixture(scope="module")
def api(data_settings: Settings) -> Iterator[Any]:
    with app_client(data_settings) as c:
        yield c


def new_key(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as session:
        key, _ = create_api_key(session, f"jobdata-{uuid.uuid4().hex[:8]}", "test")
    return key


@pytest.fixture(scope="module")
def owner(data_settings: Settings) -> str:
    return new_key(data_settings)


@pytest.fixture(scope="module")
def datasets(api: Any, data_settings: Settings, owner: str) -> dict[str, dict[str, Any]]:
    """One ready data set of each kind, in its official format, validated in-process."""
    archives = {"images": tar_bytes(images_files()), "pope": zip_bytes(pope_files()),
                "scienceqa": tar_bytes(scienceqa_files()), "conversations": zip_bytes(conversations_files())}
    found = {kind: validated(api, data_settings, owner, kind, archive) for kind, archive in archives.items()}
    for ds in found.values():
        assert ds["state"] == "ready", ds["reasons"]
    return found


def all_data(datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"calibration": datasets["images"]["id"],
            "evaluation": {"pope": datasets["pope"]["id"], "scienceqa": datasets["scienceqa"]["id"]},
            "recovery": datasets["conversations"]["id"]}


def run_to_end(api: Any, key: str, body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from worker.pipeline import run_job

    r = api.post("/jobs", json=body, headers=auth(key))
    assert r.status_code == 201, r.text
    assert run_job(r.json()["id"], settings) in ("succeeded", "failed")
    return dict(api.get(f"/jobs/{r.json()['id']}", headers=auth(key)).json())


def names(ds: dict[str, Any]) -> dict[str, str]:
    return {"id": ds["id"], "sha256": ds["sha256"]}


def test_a_tiny_llava_job_runs_end_to_end_on_the_tenants_data(
    api: Any, owner: str, datasets: dict[str, dict[str, Any]], data_settings: Settings
) -> None:
    body = {**CHEAP, "evaluation": {"max_samples": 16}, "recovery": {"steps": 2, "batch_size": 1},
            "data": all_data(datasets)}
    job = run_to_end(api, owner, body, data_settings)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert job["options"]["data"]["recovery"]["sha256"] == datasets["conversations"]["sha256"]

    benchmarks = {"pope": names(datasets["pope"]), "scienceqa": names(datasets["scienceqa"])}
    for metrics in (result["dense"]["metrics"], result["metrics"]["evaluation"], result["plans"][0]["metrics"]):
        assert metrics["data"] == benchmarks
        assert {split: m["n"] for split, m in metrics["pope"].items()} == POPE_QUESTIONS
        assert metrics["scienceqa"]["n"] == SQA_TEST_PROBLEMS
    assert result["calibration"] == {"source": "images", "data": names(datasets["images"]), "warning": None}
    recovery = result["recovery"]
    assert recovery["data"] == names(datasets["conversations"])
    assert recovery["conversations"] == 2 and recovery["steps"] == 2
    assert result["stages"]["recover"]["status"] == "done" and result["stages"]["evaluate"]["status"] == "done"


def test_without_evaluation_data_a_tiny_model_evaluates_nothing_and_says_so(
    api: Any, owner: str, data_settings: Settings
) -> None:
    job = run_to_end(api, owner, CHEAP, data_settings)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    evaluate = result["stages"]["evaluate"]
    assert evaluate["status"] == "skipped"
    assert "no evaluation data" in evaluate["reason"] and "evaluation.world" in evaluate["reason"]
    assert "metrics" not in result["dense"] and "evaluation" not in result["metrics"]
    assert result["calibration"]["source"] == "synthetic"


def test_the_synthetic_world_is_evaluated_only_when_asked_and_named(
    api: Any, owner: str, data_settings: Settings
) -> None:
    body = {**CHEAP, "evaluation": {"max_samples": 2, "world": True}}
    job = run_to_end(api, owner, body, data_settings)
    assert job["status"] == "succeeded", job["error"]
    for metrics in (job["result"]["dense"]["metrics"], job["result"]["metrics"]["evaluation"]):
        assert metrics["data"].startswith("synthetic world (seed ")


def error_of(api: Any, key: str, body: dict[str, Any]) -> tuple[int, str, str]:
    r = api.post("/jobs", json={**CHEAP, **body}, headers=auth(key))
    err = r.json()["error"]
    return r.status_code, err["code"], err["message"]


def test_references_it_cannot_use_are_refused_with_what_to_fix(
    api: Any, owner: str, datasets: dict[str, dict[str, Any]], data_settings: Settings
) -> None:
    missing = str(uuid.uuid4())
    status, code, message = error_of(api, owner, {"data": {"calibration": missing}})
    assert (status, code) == (422, "invalid_data_reference")
    assert f"data.calibration: dataset {missing} does not exist" in message and "GET /datasets" in message

    other = new_key(data_settings)  # another tenant's data set is answered as a missing one
    status, code, message = error_of(api, other, {"data": {"evaluation": {"pope": datasets["pope"]["id"]}}})
    assert (status, code) == (422, "invalid_data_reference") and "does not exist" in message

    status, code, message = error_of(api, owner, {"data": {"recovery": datasets["pope"]["id"]}})
    assert (status, code) == (422, "invalid_data_reference")
    assert "is of kind pope" in message and "kind conversations" in message
    status, code, _ = error_of(api, owner, {"data": {"search": {"scienceqa": datasets["images"]["id"]}}})
    assert (status, code) == (422, "invalid_data_reference")

    uploading = create(api, owner, "images")
    status, code, message = error_of(api, owner, {"data": {"calibration": uploading["id"]}})
    assert (status, code) == (409, "dataset_not_ready") and "is uploading" in message

    status, code, message = error_of(api, owner, {"recovery": {"steps": 2}})
    assert (status, code) == (422, "recovery_needs_data")
    assert "upload a conversations dataset" in message and "data.recovery" in message

    status, code, _ = error_of(api, owner, {"data": {"calibration": datasets["images"]["id"], "extra": 1}})
    assert status == 422
    status, code, _ = error_of(api, owner, {"data": {"calibration": "not-an-id"}})
    assert status == 422


def test_a_data_set_a_queued_job_names_cannot_be_deleted(
    api: Any, owner: str, datasets: dict[str, dict[str, Any]]
) -> None:
    r = api.post("/jobs", json={**CHEAP, "data": {"evaluation": {"scienceqa": datasets["scienceqa"]["id"]}}},
                 headers=auth(owner))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["options"]["data"]["evaluation"]["scienceqa"]["id"] == datasets["scienceqa"]["id"]
    deleted = api.delete(f"/datasets/{datasets['scienceqa']['id']}", headers=auth(owner))
    assert deleted.status_code == 409 and deleted.json()["error"]["detail"]["jobs"] == [job_id]
    assert api.post(f"/jobs/{job_id}/cancel", headers=auth(owner)).status_code == 202


def test_the_cli_names_data_sets_by_id(
    api: Any, owner: str, datasets: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hipp_client import HippClient
    from worker.cli import jobs as cli
    from worker.cli import main

    def wired(args: Any) -> HippClient:
        api.headers["Authorization"] = f"Bearer {owner}"
        return HippClient("http://testserver", None, http=api)

    monkeypatch.setattr(cli, "_client", wired)
    args = ["jobs", "submit", "--model", "tiny-llava", "--preference", "utility=1", "--recovery-steps", "1",
            "--data", f'{{"search": {{"pope": "{datasets["pope"]["id"]}"}}}}',
            "--data-calibration", datasets["images"]["id"], "--data-pope", datasets["pope"]["id"],
            "--data-scienceqa", datasets["scienceqa"]["id"], "--data-recovery", datasets["conversations"]["id"]]
    assert main(args) == 0
    job_id = capsys.readouterr().out.strip()
    data = api.get(f"/jobs/{job_id}", headers=auth(owner)).json()["options"]["data"]
    assert {place: ref["id"] for place, ref in data["evaluation"].items()} == {
        "pope": datasets["pope"]["id"], "scienceqa": datasets["scienceqa"]["id"]}
    assert data["search"]["pope"]["id"] == datasets["pope"]["id"]
    assert (data["calibration"]["id"], data["recovery"]["id"]) == (datasets["images"]["id"],
                                                                    datasets["conversations"]["id"])
    assert api.post(f"/jobs/{job_id}/cancel", headers=auth(owner)).status_code == 202
    # The light client takes ids as strings, UUIDs or the Dataset objects it returns.
    hipp = wired(None)
    job = hipp.submit_job("tiny-llava", {"utility": 1}, data={
        "calibration": hipp.get_dataset(datasets["images"]["id"]),
        "evaluation": {"pope": uuid.UUID(datasets["pope"]["id"])}})
    assert job.options["data"]["calibration"]["id"] == datasets["images"]["id"]
    assert job.options["data"]["evaluation"]["pope"]["sha256"] == datasets["pope"]["sha256"]
    hipp.cancel_job(job.id)
    with pytest.raises(SystemExit) as refused:
        main(["jobs", "submit", "--model", "tiny-llava", "--preference", "utility=1", "--data", "[1]"])
    assert refused.value.code == 2 and "--data: expected a JSON object" in capsys.readouterr().err


def test_an_archive_changed_after_validation_fails_the_job_with_a_clear_error(
    api: Any, owner: str, data_settings: Settings
) -> None:
    from app.storage import get_storage
    from worker.pipeline import run_job

    ds = validated(api, data_settings, owner, "images", tar_bytes(images_files()))
    r = api.post("/jobs", json={**CHEAP, "data": {"calibration": ds["id"]}}, headers=auth(owner))
    assert r.status_code == 201, r.text
    key = r.json()["options"]["data"]["calibration"]["key"]
    get_storage(data_settings).put_bytes(key, tar_bytes({"other.png": b"not the validated archive"}))
    assert run_job(r.json()["id"], data_settings) == "failed"
    error = api.get(f"/jobs/{r.json()['id']}", headers=auth(owner)).json()["error"]
    assert error["code"] == "invalid_data" and not error["retryable"]
    assert f"data set {ds['id']}" in error["message"] and "SHA-256" in error["message"]
    assert "upload it again as a new data set" in error["message"]


class Events:
    """Stands in for the job's run where only its events are read."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def event(self, message: str, **_: Any) -> None:
        self.messages.append(message)


def test_the_plan_search_scores_plans_on_the_named_data(
    api: Any, owner: str, datasets: dict[str, dict[str, Any]], data_settings: Settings, tmp_path: Any
) -> None:
    """A trained policy's plans are scored on ``data.search`` (the tiny models have no policy, so the search
    set is built here the way the plan stage builds it)."""
    from app.models import Job
    from app.storage import get_storage
    from worker.pipeline.context import JobContext
    from worker.pipeline.stages import search_set

    search = {"pope": datasets["pope"]["id"], "scienceqa": datasets["scienceqa"]["id"]}
    r = api.post("/jobs", json={**CHEAP, "data": {"search": search}}, headers=auth(owner))
    assert r.status_code == 201, r.text
    assert api.post(f"/jobs/{r.json()['id']}/cancel", headers=auth(owner)).status_code == 202
    job = Job(model="tiny-llava", options={**r.json()["options"], "evaluation": {"max_samples": 3}})
    run = Events()
    ctx = JobContext(job, run, data_settings, get_storage(data_settings), tmp_path)  # type: ignore[arg-type]
    evalset, label = search_set(ctx)
    assert evalset is not None and label == {"pope": names(datasets["pope"]), "scienceqa": names(datasets["scienceqa"])}
    assert {split: len(qs) for split, qs in evalset.pope.items()} == dict.fromkeys(POPE_QUESTIONS, 3)
    assert len(evalset.sqa) == 1  # no val problems: the split that has problems with an image
    assert sum(m.startswith("fetching") for m in run.messages) == 2
    search_set(ctx)  # the unpacked files are reused within the job
    assert sum(m.startswith("fetching") for m in run.messages) == 2


def test_a_policy_trains_on_the_tenants_search_data(api: Any, data_settings: Settings, owner: str,
                                                    datasets: dict[str, dict[str, Any]]) -> None:
    """A model other than the testbed trains its policy on the tenant's POPE / ScienceQA data sets
    (``train.search``), run in-process; the result and the policy name them."""
    from worker.pipeline import run_job

    search = {"pope": datasets["pope"]["id"], "scienceqa": datasets["scienceqa"]["id"]}
    train = {"steps": 1, "group_size": 2, "preferences_per_step": 1, "calibration_samples": 3, "search": search}
    r = api.post("/policies", json={"name": "tiny", "model": "tiny-llava", "train": train}, headers=auth(owner))
    assert r.status_code == 201, r.text
    policy = r.json()
    assert run_job(policy["job_id"], data_settings) == "succeeded"
    job = api.get(f"/jobs/{policy['job_id']}", headers=auth(owner)).json()
    label = {"pope": names(datasets["pope"]), "scienceqa": names(datasets["scienceqa"])}
    assert job["result"]["search"]["data"] == label
    assert job["result"]["calibration"]["source"] != "images"  # no calibration data set named: the engine's
    ready = api.get(f"/policies/{policy['id']}", headers=auth(owner)).json()
    assert ready["status"] == "ready" and ready["metrics"]["search"] == label and ready["metrics"]["steps"] == 1


def test_an_evaluation_worker_rebuilds_the_search_set_from_the_named_data(
    api: Any, owner: str, datasets: dict[str, dict[str, Any]], data_settings: Settings, tmp_path: Any
) -> None:
    """With HIPP_EVALUATION_MODE=queue a worker on another machine fetches the job's search data sets itself
    (worker/evaluation_queue.py) and must score on exactly the job's questions: same fingerprint."""
    from app.models import Job
    from app.storage import get_storage
    from worker.evaluation_queue import build_evalset
    from worker.pipeline.context import JobContext
    from worker.pipeline.stages import search_set, search_spec

    search = {"pope": datasets["pope"]["id"], "scienceqa": datasets["scienceqa"]["id"]}
    r = api.post("/jobs", json={**CHEAP, "data": {"search": search}}, headers=auth(owner))
    assert r.status_code == 201, r.text
    assert api.post(f"/jobs/{r.json()['id']}/cancel", headers=auth(owner)).status_code == 202
    job = Job(model="tiny-llava", options={**r.json()["options"], "evaluation": {"max_samples": 3}})
    ctx = JobContext(job, Events(), data_settings, get_storage(data_settings), tmp_path / "job")  # type: ignore[arg-type]
    evalset, _ = search_set(ctx)
    assert evalset is not None
    spec = search_spec(ctx)
    assert spec["kind"] == "datasets" and spec["limit"] == 3
    assert {kind: ref["sha256"] for kind, ref in spec["data"].items()} == {
        kind: datasets[kind]["sha256"] for kind in ("pope", "scienceqa")}

    worker = data_settings.model_copy(update={"work_dir": tmp_path / "evaluation-worker"})
    rebuilt = build_evalset(spec, worker)
    assert rebuilt.fingerprint() == evalset.fingerprint()
    assert all(q.image.startswith(str(tmp_path / "evaluation-worker")) for qs in rebuilt.pope.values() for q in qs)
