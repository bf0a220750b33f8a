"""Crash safety through real worker processes: kill -9 mid-stage, a job that always crashes its worker,
cancel during a long stage, duplicate delivery. Each test ends with the job in a final state, run to
completion exactly once, and the worker free.

Beat (relay + reaper, every second here) runs in its own light worker for the whole module; leases are 5 s,
so a killed worker's job is re-queued about 6 s after the kill and resumes at its first unfinished stage.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.queue import publish
from tests.faults.conftest import FINAL, Proc, auth, beat_worker, gpu_worker, wait_for
from tests.service.test_datasets import ready_conversations

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]

STAGES = ("load", "sensitivity", "plan", "prune", "recover", "evaluate", "upload")


@pytest.fixture(scope="module")
def beat(fault_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = beat_worker(fault_settings, tmp_path_factory.mktemp("beat")).start()
    yield proc
    proc.stop()


class Workers:
    """The GPU worker of this module: started on demand, killed by the tests."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder, self.n = settings, folder, 0
        self.current: Proc | None = None

    def ensure(self) -> Proc:
        if self.current is None or not self.current.alive():
            self.n += 1
            self.current = gpu_worker(self.settings, self.folder / f"worker-{self.n}.log").start()
        return self.current

    def kill9(self) -> None:
        assert self.current is not None
        self.current.kill9()
        self.current = None

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.folder.glob("worker-*.log")))


@pytest.fixture(scope="module")
def workers(fault_settings: Settings, beat: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(fault_settings, tmp_path_factory.mktemp("workers"))
    w.ensure()
    yield w
    if w.current is not None:
        w.current.stop()


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny-llava",
        "preference": {"utility": 0.5, "robustness": 0.2, "compression": 0.3},
        "evaluation": {"enabled": False},
        **extra,
    }


def submit(api: Any, key: str, payload: dict[str, Any]) -> str:
    r = api.post("/jobs", json=payload, headers=auth(key))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def get(api: Any, key: str, job_id: str) -> dict[str, Any]:
    r = api.get(f"/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return dict(r.json())


def events(api: Any, key: str, job_id: str) -> list[str]:
    items = api.get(f"/jobs/{job_id}/events", params={"limit": 1000}, headers=auth(key)).json()["items"]
    return [e["message"] for e in items]


def wait_final(api: Any, key: str, job_id: str, workers: Workers, timeout: float = 150) -> dict[str, Any]:
    try:
        return wait_for(lambda: get(api, key, job_id), lambda j: j["status"] in FINAL, timeout, f"job {job_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nevents: {events(api, key, job_id)[-15:]}\n{workers.logs()}") from None


def in_stage(stage: str, min_progress: float = 0.0) -> Any:
    return lambda j: (j["stage"] == stage and j["stage_progress"] > min_progress) or j["status"] in FINAL


def assert_ran_once(api: Any, key: str, job: dict[str, Any], resumed_at: str, attempt: int = 2) -> list[str]:
    """Succeeded on ``attempt``; stages before ``resumed_at`` finished by attempt 1 and were reused, the rest
    ran on the last attempt; the checkpoint was written once and matches its SHA-256."""
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == attempt and job["progress"] == 1.0
    stages = job["result"]["stages"]
    first = STAGES.index(resumed_at)
    assert {s: stages[s]["attempt"] for s in STAGES[:first]} == dict.fromkeys(STAGES[:first], 1), stages
    assert {s: stages[s]["attempt"] for s in STAGES[first:]} == dict.fromkeys(STAGES[first:], attempt), stages
    msgs = events(api, key, job["id"])
    assert any("re-queued" in m for m in msgs), msgs  # the reaper noticed the dead worker
    assert any(m.startswith(f"resuming at {resumed_at}") for m in msgs), msgs
    for s in STAGES[:first]:
        assert f"{s} reused (finished by attempt 1)" in msgs
        assert msgs.count(f"{s} started") == 1, (s, msgs)
    assert sum(m.startswith("upload finished") for m in msgs) == 1
    assert msgs.count("job succeeded") == 1 and msgs[-1] == "job succeeded"
    arts = api.get(f"/jobs/{job['id']}/artifacts", headers=auth(key)).json()
    ckpt = [a for a in arts if a["name"] == "checkpoint.tar"]
    assert len(ckpt) == 1 and ckpt[0]["sha256"] == job["result"]["checkpoint"]["sha256"]
    data = httpx.get(ckpt[0]["url"], timeout=30).content
    assert hashlib.sha256(data).hexdigest() == ckpt[0]["sha256"]
    return msgs


@pytest.mark.parametrize(
    ("stage", "options"),
    [
        ("sensitivity", {"calibration": {"sensitivity_samples": 48}}),
        # "pruning": the plan stage's importance scoring over calibration images (the surgery itself is
        # instantaneous on the tiny model)
        ("plan", {"calibration": {"samples": 160}}),
        ("recover", {"recovery": {"steps": 30, "batch_size": 1}}),
    ],
)
def test_kill9_mid_stage_resumes_and_finishes_once(  # type: ignore[no-untyped-def]
    api, tenant_key, fault_settings, workers: Workers, stage: str, options: dict[str, Any]
) -> None:
    """The worker is SIGKILLed at its first unit of progress inside ``stage`` on attempt 1 (fault injection),
    so the kill lands mid-stage however fast the machine is; a fresh worker must finish the job once."""
    if "recovery" in options:  # a tiny model recovers on the tenant's conversations only
        options = {**options, "data": {"recovery": ready_conversations(api, fault_settings, tenant_key)}}
    workers.ensure()
    fault = {"fault": {"crash_in": stage, "attempts": [1]}}
    job_id = submit(api, tenant_key, body(metadata=fault, **options))

    def injected(messages: list[str]) -> bool:
        return any(m.startswith("fault injection: killing worker") and m.endswith(f"inside {stage}") for m in messages)

    wait_for(lambda: events(api, tenant_key, job_id), injected, 120, f"the kill inside {stage}")  # type: ignore[arg-type]
    assert get(api, tenant_key, job_id)["status"] == "running"
    workers.kill9()  # the pool child is gone; take the whole worker down, as a dead machine would
    killed = time.monotonic()
    workers.ensure()
    job = wait_final(api, tenant_key, job_id, workers)
    assert_ran_once(api, tenant_key, job, resumed_at=stage)
    if stage == "recover":
        assert "restored the weights saved after prune" in events(api, tenant_key, job_id)
    print(f"kill -9 inside {stage}: finished {time.monotonic() - killed:.1f}s after the kill")


def test_a_job_that_always_crashes_its_worker_fails_after_the_cap(api, tenant_key, workers: Workers) -> None:  # type: ignore[no-untyped-def]
    workers.ensure()
    job_id = submit(api, tenant_key, body(metadata={"fault": {"crash_at": "load"}}))
    job = wait_final(api, tenant_key, job_id, workers, timeout=90)
    assert job["status"] == "failed" and job["attempt"] == job["max_attempts"] == 3
    assert job["error"]["code"] == "attempts_exhausted" and job["error"]["retryable"] is False
    assert "3 of 3" in job["error"]["message"]
    msgs = events(api, tenant_key, job_id)
    assert sum(m.startswith("fault injection: killing worker") for m in msgs) == 3
    assert sum("re-queued" in m for m in msgs) == 2 and msgs[-1] == "job failed"
    # the worker survives its children being killed and takes the next job
    assert workers.current is not None and workers.current.alive()


def test_cancel_during_a_long_stage_then_the_worker_is_free_and_a_duplicate_runs_once(  # type: ignore[no-untyped-def]
    api, tenant_key, workers: Workers, fault_settings: Settings
) -> None:
    workers.ensure()
    conversations = {"recovery": ready_conversations(api, fault_settings, tenant_key)}
    long_id = submit(api, tenant_key, body(recovery={"steps": 2000, "batch_size": 1}, data=conversations))
    wait_for(lambda: get(api, tenant_key, long_id), in_stage("recover", 0.0), 120, "recovery to start")
    # a second job waits behind it; it is also delivered twice more (duplicate messages)
    next_id = submit(api, tenant_key, body())
    publish(fault_settings, uuid.UUID(next_id))
    publish(fault_settings, uuid.UUID(next_id))
    r = api.post(f"/jobs/{long_id}/cancel", headers=auth(tenant_key))
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    asked = time.monotonic()
    job = wait_for(lambda: get(api, tenant_key, long_id), lambda j: j["status"] in FINAL, 5.0, "cancel within 5 s")
    took = time.monotonic() - asked
    assert job["status"] == "cancelled", job
    msgs = events(api, tenant_key, long_id)
    assert "cancelled at the caller's request" in msgs and msgs[-1] == "job cancelled"
    print(f"cancel during recover: cancelled {took:.2f}s after the request")
    # the worker is free: the next job is claimed and runs, once, despite three deliveries
    nxt = wait_final(api, tenant_key, next_id, workers, timeout=90)
    assert nxt["status"] == "succeeded" and nxt["attempt"] == 1, nxt
    msgs = events(api, tenant_key, next_id)
    assert sum(m.startswith("attempt ") and " started by " in m for m in msgs) == 1, msgs
    assert msgs.count("load started") == 1 and msgs.count("job succeeded") == 1
    arts = api.get(f"/jobs/{next_id}/artifacts", headers=auth(tenant_key)).json()
    assert [a["name"] for a in arts].count("checkpoint.tar") == 1
