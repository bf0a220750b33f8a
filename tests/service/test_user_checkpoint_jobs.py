"""Service jobs on checkpoints as users have them (built outside the project by stock transformers, see
``tests/stock_checkpoints.py``), through a real Celery worker process, Postgres, Redis and the S3 server:

- a stock-saved and a hub-layout Qwen2.5-VL and a hub-layout Qwen2-VL prune at 30% and 0% (no torchvision
  here); the downloaded export loads in plain transformers with no missing or unexpected keys, and the 0%
  export's logits equal the original's;
- a bf16 export split into several shards travels through the archive and the signed URL intact;
- a folder that cannot load fails at once, not retried, with ``model_not_loadable`` and a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.config import Settings
from tests.service.conftest import auth
from tests.service.test_worker_job import api_client, poll, running_worker
from tests.test_user_checkpoints import build_stock, reload, save_batch, weight_dtypes
from worker.hipp.models.loading import load_model

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-models")
    for kind in ("qwen2.5-vl-stock", "qwen2.5-vl-hub", "qwen2-vl-hub"):
        build_stock(kind, root / kind)
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((root / "qwen2.5-vl-hub" / "config.json").read_bytes())
    return root


@pytest.fixture(scope="module")
def user_settings(stack_settings: Settings, user_models: Path) -> Settings:
    return stack_settings.model_copy(update={"gpu_queue": f"{stack_settings.gpu_queue}-u", "model_dirs": [user_models]})


@pytest.fixture(scope="module")
def user_worker(user_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_worker(user_settings, tmp_path_factory.mktemp("user-worker") / "worker.log") as log_path:
        yield log_path


@pytest.fixture
def uclient(user_settings: Settings):  # type: ignore[no-untyped-def]
    with api_client(user_settings) as c:
        yield c


def download_checkpoint(client, key: str, job: dict, into: Path) -> Path:  # type: ignore[no-untyped-def]
    arts = {a["name"]: a for a in client.get(f"/jobs/{job['id']}/artifacts", headers=auth(key)).json()}
    ckpt = arts["checkpoint.tar"]
    response = httpx.get(ckpt["url"])
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == ckpt["sha256"] == job["result"]["checkpoint"]["sha256"]
    archive = into / "checkpoint.tar"
    archive.write_bytes(response.content)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "checkpoint"


@pytest.mark.parametrize(
    ("kind", "sparsity", "export"),
    [
        ("qwen2.5-vl-stock", 0.3, {}),
        ("qwen2.5-vl-stock", 0.0, {}),
        ("qwen2.5-vl-hub", 0.3, {}),
        ("qwen2.5-vl-hub", 0.0, {}),
        ("qwen2-vl-hub", 0.3, {"dtype": "bfloat16", "max_shard_size_mb": 0.1}),
        ("qwen2-vl-hub", 0.0, {}),
    ],
)
def test_user_checkpoint_job_exports_a_loadable_checkpoint(  # type: ignore[no-untyped-def]
    kind: str, sparsity: float, export: dict, user_worker, uclient, tenant_key, user_models: Path, tmp_path: Path
) -> None:
    source = user_models / kind
    body = {"model": str(source), "preference": {"utility": 1}, "target_sparsity": sparsity,
            "evaluation": {"max_samples": 2}, "export": export}
    r = uclient.post("/jobs", json=body, headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    job, _ = poll(uclient, tenant_key, r.json()["id"])
    assert job["status"] == "succeeded", (job["error"], user_worker.read_text()[-3000:])
    assert abs(job["result"]["chosen_plan"]["sparsity"] - sparsity) < 0.05

    latency = job["result"]["metrics"]["latency"]  # measured on the worker's device, dense and pruned
    assert latency["device"].startswith("cpu") and latency["ideal_speedup"] >= 1.0
    for model in ("dense", "pruned"):
        assert latency[model]["prefill_ms"] > 0 and latency[model]["decode_ms_per_token"] >= 0
        assert latency[model]["prompt_tokens"] > 0 and latency[model]["static_cache"] is True
    assert latency["speedup_over_ideal"]["prefill"] > 0

    checkpoint = download_checkpoint(uclient, tenant_key, job, tmp_path)
    assert "## Latency" in (checkpoint / "README.md").read_text()
    assert job["result"]["checkpoint"]["weight_files"] == sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if export.get("dtype") == "bfloat16":
        assert job["result"]["checkpoint"]["dtype"] == "bfloat16" and weight_dtypes(checkpoint) == {torch.bfloat16}
        assert len(job["result"]["checkpoint"]["weight_files"]) >= 2
        assert (checkpoint / "model.safetensors.index.json").is_file()
    else:
        assert weight_dtypes(checkpoint) == {torch.float32}
    for name in ("tokenizer.json", "processor_config.json", "preprocessor_config.json", "chat_template.json"):
        if (source / name).is_file():
            assert (checkpoint / name).read_bytes() == (source / name).read_bytes(), name

    original = load_model(str(source))
    save_batch(original, tmp_path / "batch.pt")
    report = reload(checkpoint, tmp_path / "batch.pt", tmp_path / "logits.pt")
    assert report["info"]["missing_keys"] == [] and report["info"]["unexpected_keys"] == []
    if sparsity == 0.0:
        batch = torch.load(tmp_path / "batch.pt")
        with torch.no_grad():
            assert torch.equal(torch.load(tmp_path / "logits.pt"), original.model(**batch).logits)


def test_a_checkpoint_that_cannot_load_fails_once_without_retry(  # type: ignore[no-untyped-def]
    user_worker, uclient, tenant_key, user_models: Path
) -> None:
    body = {"model": str(user_models / "broken"), "preference": {"utility": 1}}
    r = uclient.post("/jobs", json=body, headers=auth(tenant_key))
    assert r.status_code == 201, r.text
    job, _ = poll(uclient, tenant_key, r.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["attempt"] == 1
    error = job["error"]
    assert error["code"] == "model_not_loadable" and error["retryable"] is False
    assert "cannot load the weights" in error["message"] and "\n" not in error["message"]
    assert "Traceback" not in json.dumps(error)
