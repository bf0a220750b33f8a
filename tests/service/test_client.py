"""The light client (client/hipp_client) against the real API over HTTP (uvicorn on a free port; Postgres, Redis,
S3 on moto): submit, wait, typed results, a download kept only when its SHA-256 matches the artifact record,
error answers as ``HippApiError``, cursor pagination, policies, and ``POST /jobs`` retried only with an
idempotency key. A job is finished here as a worker would finish it (its row, its checkpoint archive in S3)
without running the engine. The distribution itself (httpx only, no torch) is checked in a clean venv."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.main import create_app
from app.models import Artifact, Event, Job, utcnow
from app.storage import get_storage
from hipp_client import CHECKSUM_MISMATCH, UNREACHABLE, HippApiError, HippClient
from hipp_client import Job as ClientJob
from tests.service.conftest import free_port

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
PREFERENCE = {"utility": 2.0, "robustness": 1.0, "compression": 1.0}


@pytest.fixture(scope="module")
def api_url(stack_settings: Settings) -> Iterator[str]:
    with serving(stack_settings, free_port()) as url:
        yield url


@pytest.fixture
def hipp(api_url: str, tenant_key: str) -> Iterator[HippClient]:
    with HippClient(api_url, tenant_key, retry_s=5) as c:
        yield c


class serving:
    """The API app under uvicorn in a thread, on ``port``, while the block runs."""

    def __init__(self, settings: Settings, port: int) -> None:
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=15)


def checkpoint_archive(files: dict[str, bytes]) -> bytes:
    """A checkpoint.tar as the worker uploads it: one ``checkpoint/`` folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"checkpoint/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def finish_job(settings: Settings, job_id: str, archive: bytes) -> None:
    """What a worker's last stages leave behind: the archive in object storage with its artifact record,
    events, the plans considered, and the job succeeded."""
    obj = get_storage(settings).put_bytes(f"jobs/{job_id}/checkpoint.tar", archive)
    plan = {"chosen": True, "source": "baseline", "plan": {"sparsity": 0.3}, "metrics": {"parameters": 10}}
    result = {"metrics": {"parameters": 10, "dense_parameters": 14}, "plans": [plan], "plan_source": "baseline"}
    jid = uuid.UUID(job_id)
    with session_scope(settings.resolved_database_url) as s:
        s.add(Artifact(job_id=jid, kind="checkpoint", name="checkpoint.tar", key=obj.key, size=obj.size,
                       sha256=obj.sha256, content_type="application/x-tar"))
        s.add_all([Event(job_id=jid, stage="upload", message="upload started"),
                   Event(job_id=jid, stage="upload", message="job succeeded", data={"n": 1})])
        s.execute(update(Job).where(Job.id == jid).values(
            status="succeeded", stage="upload", progress=1.0, result=result, finished_at=utcnow()))


def _set(settings: Settings, job_id: str, **values: object) -> None:
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(**values))


def _later(delay: float, fn, *args, **kw) -> None:  # type: ignore[no-untyped-def]
    threading.Thread(target=lambda: (time.sleep(delay), fn(*args, **kw)), daemon=True).start()


def test_submit_wait_and_a_verified_download(hipp: HippClient, stack_settings: Settings, tmp_path: Path) -> None:
    job = hipp.submit_job("tiny-llava", PREFERENCE, evaluation={"max_samples": 4}, metadata={"run": "client"})
    assert isinstance(job, ClientJob) and job.status == "queued" and not job.finished
    assert job.preference == {"utility": 0.5, "robustness": 0.25, "compression": 0.25}  # normalized by the API
    assert job.metadata == {"run": "client"} and job.options["evaluation"]["max_samples"] == 4
    assert job.created_at is not None and job.created_at.tzinfo is not None

    weights = os.urandom(50_000)
    archive = checkpoint_archive({"model.safetensors": weights, "config.json": b"{}"})
    _later(0.3, _set, stack_settings, job.id, status="running", stage="prune", progress=0.5)
    _later(1.3, finish_job, stack_settings, job.id, archive)
    seen: list[tuple[str, float]] = []
    done = hipp.wait(job.id, timeout=60, on_update=lambda j: seen.append((j.status, j.progress)))
    assert done.status == "succeeded" and done.finished and done.metrics == {"parameters": 10, "dense_parameters": 14}
    assert seen[0] == ("queued", 0.0) and seen[-1] == ("succeeded", 1.0) and ("running", 0.5) in seen
    assert hipp.get_job(job.id) == done

    events = hipp.events(job.id)
    assert [e.message for e in events][-2:] == ["upload started", "job succeeded"] and events[-1].data == {"n": 1}
    assert [e.message for e in hipp.events(job.id, after=events[-2].id)] == ["job succeeded"]
    assert [e.id for e in events] == sorted(e.id for e in events)
    [plan] = hipp.plans(job.id)
    assert plan.chosen and plan.source == "baseline" and plan.plan == {"sparsity": 0.3}
    [art] = hipp.artifacts(job.id)
    assert (art.name, art.size, art.sha256) == ("checkpoint.tar", len(archive), hashlib.sha256(archive).hexdigest())
    assert art.expires_at is not None and "X-Amz-Signature" in art.url

    path = hipp.download(job.id, tmp_path / "out")
    assert path == tmp_path / "out" / "checkpoint"
    assert (path / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint"]  # the archive removed
    raw = hipp.download(job.id, tmp_path / "raw", unpack=False)
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == art.sha256


def test_a_download_whose_bytes_changed_is_refused(
    hipp: HippClient, stack_settings: Settings, tmp_path: Path
) -> None:
    job = hipp.submit_job("tiny-llava", PREFERENCE)
    archive = checkpoint_archive({"model.safetensors": b"w" * 4000})
    finish_job(stack_settings, job.id, archive)
    # The stored object changes after the record was made (same size, other bytes): the record's sha256 wins.
    tampered = archive.replace(b"w" * 4000, b"x" * 4000)
    assert len(tampered) == len(archive)
    get_storage(stack_settings).put_bytes(f"jobs/{job.id}/checkpoint.tar", tampered)
    out = tmp_path / "out"
    with pytest.raises(HippApiError) as info:
        hipp.download(job.id, out)
    assert info.value.code == CHECKSUM_MISMATCH and hashlib.sha256(archive).hexdigest() in info.value.message
    assert list(out.iterdir()) == []  # neither the archive nor a partial file is left
    with pytest.raises(HippApiError) as info:
        hipp.download(job.id, out, "weights.bin")
    assert info.value.code == "no_such_artifact" and "checkpoint.tar" in info.value.message


def test_error_answers_are_hipp_api_errors(hipp: HippClient, api_url: str) -> None:
    with pytest.raises(HippApiError) as info:
        hipp.get_job(str(uuid.uuid4()))
    assert (info.value.status, info.value.code) == (404, "not_found") and "does not exist" in info.value.message
    with pytest.raises(HippApiError) as info:
        hipp.submit_job("tiny-llava", {"utility": -1.0})
    assert info.value.status == 422 and "must be >= 0" in info.value.message
    assert "[422 " in str(info.value)
    job = hipp.submit_job("tiny-llava", PREFERENCE)
    with pytest.raises(HippApiError) as info:
        hipp.delete_job(job.id)
    assert (info.value.status, info.value.code, info.value.detail) == (409, "job_active", {"status": "queued"})
    assert hipp.cancel_job(job.id).status == "cancelled"
    hipp.delete_job(job.id)
    with pytest.raises(HippApiError) as info:
        hipp.get_job(job.id)
    assert info.value.status == 404
    with HippClient(api_url, "hipp_nothere_wrongkey", retry_s=1) as stranger, pytest.raises(HippApiError) as info:
        stranger.list_policies()
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")


def test_list_jobs_follows_the_cursor(hipp: HippClient) -> None:
    ids = [hipp.submit_job("tiny-llava", PREFERENCE, metadata={"i": i}).id for i in range(5)]
    hipp.cancel_job(ids[0])
    first = hipp.jobs_page(limit=2)
    assert [j.id for j in first.items] == ids[::-1][:2] and first.next_cursor
    assert [j.id for j in hipp.list_jobs(page_size=2)] == ids[::-1]
    assert [j.id for j in hipp.list_jobs("cancelled", page_size=2)] == [ids[0]]
    assert [j.id for j in hipp.list_jobs(["queued", "cancelled"], page_size=3)] == ids[::-1]


def test_answers_with_fields_the_client_does_not_know_still_read(hipp: HippClient) -> None:
    job = hipp.submit_job("tiny-llava", PREFERENCE)
    newer = {**job.raw, "queue_position": 3, "error": {"code": "x", "message": "y", "hint": "z"}}
    read = ClientJob.from_json(newer)
    assert read.id == job.id and read.error is not None and read.error.code == "x"
    assert read.raw["queue_position"] == 3
    older = {k: v for k, v in job.raw.items() if k in ("id", "status", "model", "progress")}
    assert ClientJob.from_json(older).stage is None


def test_policies(hipp: HippClient) -> None:
    policy = hipp.register_policy("p1", "tiny-llava", fingerprint="fp1", metrics={"hv": 0.7}, metadata={"by": "me"})
    assert (policy.name, policy.model, policy.fingerprint, policy.metrics) == ("p1", "tiny-llava", "fp1", {"hv": 0.7})
    assert hipp.get_policy(policy.id) == policy and policy.metadata == {"by": "me"}
    assert [p.id for p in hipp.list_policies(model="tiny-llava")] == [policy.id]
    assert hipp.list_policies(model="other") == []
    with pytest.raises(HippApiError) as info:
        hipp.get_policy(str(uuid.uuid4()))
    assert info.value.code == "not_found"
    assert policy.status == "ready" and policy.job_id is None and policy.train is None


def test_train_policy_queues_a_training_that_can_be_followed_and_cancelled(hipp: HippClient) -> None:
    """No worker consumes this session's GPU queue: the training stays queued until it is cancelled."""
    policy = hipp.train_policy("testbed", steps=3, group_size=2, seed=5, metadata={"by": "me"})
    assert (policy.status, policy.name, policy.model, policy.uri) == ("training", "testbed policy", "testbed", None)
    assert policy.train is not None and policy.train["steps"] == 3 and policy.train["group_size"] == 2
    assert policy.job_id is not None and hipp.get_job(policy.job_id).kind == "train_policy"
    assert [p.id for p in hipp.list_policies(status="training")] == [policy.id]
    hipp.cancel_job(policy.job_id)
    seen: list[str] = []
    ended = hipp.wait_policy(policy, timeout=30, on_update=lambda job: seen.append(job.status))
    assert ended.status == "cancelled" and seen[-1] == "cancelled"
    with pytest.raises(HippApiError) as info:
        hipp.train_policy("testbed", steps=0)
    assert info.value.status == 422 and "steps" in str(info.value)
    with pytest.raises(TypeError):
        hipp.train_policy("testbed", learning_rate=0.1)


def test_submit_is_retried_only_with_an_idempotency_key(stack_settings: Settings, tenant_key: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with HippClient(url, tenant_key, retry_s=30) as down:
        t0 = time.monotonic()
        with pytest.raises(HippApiError) as info:
            down.submit_job("tiny-llava", PREFERENCE)  # no key: a write is never repeated
        assert info.value.code == UNREACHABLE and info.value.status is None and time.monotonic() - t0 < 5

    api = serving(stack_settings, port)
    _later(1.5, api.__enter__)  # the API comes up while the client is retrying
    try:
        with HippClient(url, tenant_key, retry_s=30) as c:
            job = c.submit_job("tiny-llava", PREFERENCE, idempotency_key="client-retry-1")
            again = c.submit_job("tiny-llava", PREFERENCE, idempotency_key="client-retry-1")
            assert again.id == job.id and job.status == "queued"
    finally:
        api.__exit__()


def test_the_hipp_jobs_commands_run_on_the_client(
    api_url: str, tenant_key: str, stack_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    args = ["jobs", "--url", api_url, "--key", tenant_key]
    assert main([*args, "submit", "--model", "tiny-llava", "--preference", "utility=1"]) == 0
    job_id = capsys.readouterr().out.strip()
    finish_job(stack_settings, job_id, checkpoint_archive({"config.json": b"{}"}))
    assert main([*args, "wait", job_id]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["status"] == "succeeded" and "succeeded" in out.err  # the progress line
    assert main([*args, "download", job_id, "-o", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoint" / "config.json").read_bytes() == b"{}"
    capsys.readouterr()
    assert main([*args, "list", "--json", "--limit", "1"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["items"]] == [job_id]
    assert main([*args, "cancel", job_id]) == 2
    assert "already succeeded" in capsys.readouterr().err


# --- the distribution ---------------------------------------------------------------------------------------
def test_the_projects_build_ships_the_light_client(tmp_path: Path) -> None:
    """`pip install -e .` / a wheel of the project provides ``hipp_client`` (pyproject's package discovery)."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.safetensors", "*.egg-info", "build")
    for name in ("app", "worker", "client"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    import zipfile

    [wheel] = tmp_path.glob("hipp_prune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hipp_client/__init__.py", "hipp_client/client.py", "hipp_client/py.typed"} <= names


LIGHT = """
import importlib.metadata, importlib.util, sys
import hipp_client
assert importlib.metadata.requires("hipp-client") == ["httpx<1,>=0.27"], importlib.metadata.requires("hipp-client")
for heavy in ("torch", "transformers", "app", "worker", "fastapi", "sqlalchemy"):
    assert importlib.util.find_spec(heavy) is None, heavy + " is installed"
c = hipp_client.HippClient("http://127.0.0.1:9", "k", retry_s=0)
try:
    c.get_job("x")
except hipp_client.HippApiError as exc:
    assert exc.code == "unreachable", exc
print("ok")
"""


@pytest.mark.slow
def test_the_light_client_installs_alone(tmp_path: Path) -> None:
    """client/ is its own distribution: in a clean venv `pip install ./client` brings httpx and nothing heavy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    shutil.copytree(ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("__pycache__", "build"))
    python = str(venv / "bin" / "python")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", str(tmp_path / "client")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    run = subprocess.run([python, "-c", LIGHT], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.stdout[-2000:], run.stderr[-3000:])
