"""A pruning job on a tiny Qwen2.5-VL through the embedded service (`hipp serve` + the `hipp jobs` client):
it succeeds, and the downloaded checkpoint is a pruned Qwen2.5-VL that loads with its processor."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.service.conftest import free_port
from tests.service.test_datasets import conversations_files, zip_bytes
from tests.service.test_embedded import CLI, embedded_env, hipp

# A whole job (sensitivity, plan, prune, recover, evaluate, latency, export) on a loaded 2-core CI machine
# has taken over 240 s; the job is kept small below and the limit leaves room for a slow machine.
pytestmark = pytest.mark.timeout(600)
MODEL = "tiny-qwen2.5-vl"


def test_qwen_job_through_the_embedded_service(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = f"http://127.0.0.1:{free_port()}"
    env = embedded_env(home, url)
    env["HIPP_ALLOWED_MODELS"] = f"tiny-llava,{MODEL}"
    env["HIPP_API_KEY"] = hipp("api-key", "create", "--tenant", "qwen", env=env).stdout.strip()
    server = subprocess.Popen(
        [*CLI, "serve", "--port", url.rsplit(":", 1)[1]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "embedded service did not start"
            time.sleep(0.3)
        conversations = tmp_path / "conversations.zip"  # a tiny model recovers on the tenant's data only
        conversations.write_bytes(zip_bytes(conversations_files()))
        uploaded = hipp("datasets", "upload", "--kind", "conversations", "--name", "conv", str(conversations),
                        "--wait", "--timeout", "120", env=env, timeout=150)
        conversations_id = uploaded.stdout.splitlines()[0].strip()
        out = hipp(
            "jobs",
            "submit",
            "--model",
            MODEL,
            "--preference",
            "utility=1,compression=1",
            "--recovery-steps",
            "2",
            "--eval-samples",
            "8",
            "--eval-world",
            "--data-recovery",
            conversations_id,
            "--wait",
            "--download",
            str(tmp_path / "ckpt"),
            env=env,
            timeout=480,
        )
        job_id = out.stdout.splitlines()[0].strip()
        status = json.loads(hipp("jobs", "status", job_id, env=env).stdout)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
    assert status["status"] == "succeeded", status
    assert status["result"]["chosen_plan"]["sparsity"] > 0
    assert status["result"]["recovery"]["data"]["id"] == conversations_id
    ckpt = tmp_path / "ckpt" / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["hipp_base_model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["HippQwen2_5_VLForConditionalGeneration"]
    assert (ckpt / "processing_qwen_images.py").is_file()  # the processor ships as code next to the weights

    from worker.hipp.data.calibration import iter_batches, synthetic_samples
    from worker.hipp.models.loading import load_model

    loaded = load_model(str(ckpt))
    assert loaded.adapter.family == "qwen2_vl"
    assert [layer.num_heads for layer in loaded.adapter.layers()] == [
        layer["num_attention_heads"] for layer in config["hipp_layers"]
    ]
    batch = next(iter_batches(loaded, synthetic_samples(2), batch_size=2))
    assert "mm_token_type_ids" in batch and "image_grid_thw" in batch
    with torch.no_grad():
        assert loaded.model(**batch).logits.isfinite().all()
