"""Policy training through real worker processes: kill -9 after a GRPO checkpoint reached storage, then
resume on a fresh worker to the same policy an uninterrupted run with the same seed trains; and cancel
mid-training, which ends the job and its policy ``cancelled`` with nothing registered.

Beat (relay + reaper, every second) runs in its own light worker for the module; leases are 5 s."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.faults.conftest import FINAL, auth, wait_for
from tests.faults.test_worker_faults import Workers, beat, events, get, wait_final, workers  # noqa: F401

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]

TRAIN = {"group_size": 2, "preferences_per_step": 1, "search_limit": 4, "calibration_samples": 4, "seed": 11}


def train(api: Any, key: str, steps: int, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"name": "p", "model": "testbed", "train": {**TRAIN, "steps": steps}, "metadata": metadata or {}}
    r = api.post("/policies", json=body, headers=auth(key))
    assert r.status_code == 201, r.text
    return dict(r.json())


def artifact_sha(api: Any, key: str, job_id: str, name: str) -> str:
    arts = {a["name"]: a for a in api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()}
    return str(arts[name]["sha256"])


def test_kill9_after_a_checkpoint_resumes_to_the_uninterrupted_policy(api, tenant_key, workers: Workers) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Attempt 1 is SIGKILLed when GRPO step 2 has finished (its progress report), so step 1's checkpoint is in
    storage and step 2's is not; attempt 2, on a fresh worker, resumes at step 1 and trains step 2 and 3."""
    workers.ensure()
    fault = {"fault": {"crash_in": "train", "at": 2, "attempts": [1]}}
    crashed = train(api, tenant_key, 3, fault)
    reference = train(api, tenant_key, 3)
    job_id = crashed["job_id"]

    def injected(messages: list[str]) -> bool:
        return any(m.startswith("fault injection: killing worker") and m.endswith("inside train") for m in messages)

    wait_for(lambda: events(api, tenant_key, job_id), injected, 120, "the kill inside train")  # type: ignore[arg-type]
    workers.kill9()  # the pool child is gone; take the whole worker down, as a dead machine would
    workers.ensure()
    job = wait_final(api, tenant_key, job_id, workers)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job["error"]
    stages = job["result"]["stages"]
    assert {s: stages[s]["attempt"] for s in ("load", "search_setup", "train", "register")} == {
        "load": 1, "search_setup": 1, "train": 2, "register": 2}
    training = job["result"]["training"]
    assert training["resumed_from_step"] == 1 and training["steps"] == 3
    msgs = events(api, tenant_key, job_id)
    assert "restored the GRPO checkpoint of step 1 saved by an earlier attempt" in msgs, msgs
    assert sum(m.startswith("GRPO step 1 checkpointed") for m in msgs) == 1  # by attempt 1; 2 by attempt 2
    assert sum(m.startswith("GRPO step 2 checkpointed") for m in msgs) == 1
    assert any("re-queued" in m for m in msgs) and msgs[-1] == "job succeeded"

    ref = wait_final(api, tenant_key, reference["job_id"], workers)
    assert ref["status"] == "succeeded", ref["error"]
    # Same seed, same options: the resumed policy is the uninterrupted one, bit for bit.
    assert artifact_sha(api, tenant_key, job_id, "policy.safetensors") == artifact_sha(
        api, tenant_key, ref["id"], "policy.safetensors")
    assert training["learning_curve"] == ref["result"]["training"]["learning_curve"]
    for policy in (crashed, reference):
        row = api.get(f"/policies/{policy['id']}", headers=auth(tenant_key)).json()
        assert row["status"] == "ready" and row["uri"] == f"store:policies/{policy['id']}"


def test_cancel_mid_training_ends_the_job_and_its_policy(api, tenant_key, workers: Workers) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    workers.ensure()
    policy = train(api, tenant_key, 1000)
    job_id = policy["job_id"]
    wait_for(lambda: get(api, tenant_key, job_id), lambda j: (j["stage"] == "train" and j["stage_progress"] > 0)
             or j["status"] in FINAL, 120, "GRPO steps")
    r = api.post(f"/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    asked = time.monotonic()
    job = wait_for(lambda: get(api, tenant_key, job_id), lambda j: j["status"] in FINAL, 10.0, "cancel within 10 s")
    assert job["status"] == "cancelled", job
    print(f"cancel during GRPO: cancelled {time.monotonic() - asked:.2f}s after the request")
    row = api.get(f"/policies/{policy['id']}", headers=auth(tenant_key)).json()
    assert row["status"] == "cancelled" and row["uri"] is None and row["metrics"] == {}
    assert api.get(f"/jobs/{job_id}/artifacts", headers=auth(tenant_key)).json() == []
    assert [p["id"] for p in api.get("/policies", params={"status": "ready"}, headers=auth(tenant_key)).json()] == []
