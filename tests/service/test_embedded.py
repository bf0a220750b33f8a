"""The embedded default (SQLite, local store with HMAC-signed URLs, filesystem broker, `hipp serve`) runs the
same job, driven by the `hipp jobs` client; and `hipp demo` (the README's first command) succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port

pytestmark = pytest.mark.timeout(300)
CLI = [sys.executable, "-m", "worker.cli"]


def embedded_env(home: Path, url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
    env.update(HIPP_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if url:
        env.update(HIPP_API_URL=url, HIPP_PUBLIC_URL=url)
    return env


def hipp(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"hipp {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    home = tmp_path_factory.mktemp("embedded")
    url = f"http://127.0.0.1:{free_port()}"
    env = embedded_env(home, url)
    key = hipp("api-key", "create", "--tenant", "emb", env=env).stdout.strip()
    env["HIPP_API_KEY"] = key
    server = subprocess.Popen(
        [*CLI, "serve", "--port", url.rsplit(":", 1)[1]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "embedded service did not start"
        time.sleep(0.3)
    yield url, env
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=40)
    except subprocess.TimeoutExpired:
        server.kill()
    assert not (home / "hipp.db").exists() or (home / "artifacts").is_dir()


def test_embedded_job_with_the_cli_client(embedded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, env = embedded
    r = httpx.get(f"{url}/readyz").json()
    assert r["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    out = hipp(
        "jobs",
        "submit",
        "--model",
        "tiny-llava",
        "--preference",
        "utility=1,compression=1",
        "--no-eval",
        "--wait",
        "--download",
        str(tmp_path / "ckpt"),
        env=env,
    )
    job_id = out.stdout.splitlines()[0].strip()
    assert "succeeded" in out.stderr  # the progress line
    ckpt = tmp_path / "ckpt" / "checkpoint"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "hipp_plan.json").is_file()
    status = json.loads(hipp("jobs", "status", job_id, env=env).stdout)
    assert status["status"] == "succeeded" and status["result"]["plan_source"] == "baseline"
    # signed local URLs: the artifact URL works without the API key, a tampered one does not
    arts = httpx.get(
        f"{url}/jobs/{job_id}/artifacts", headers={"Authorization": f"Bearer {env['HIPP_API_KEY']}"}
    ).json()
    plan_url = next(a["url"] for a in arts if a["name"] == "hipp_plan.json")
    assert plan_url.startswith(f"{url}/files/")
    assert httpx.get(plan_url).json()["fingerprint"] == status["result"]["chosen_plan"]["fingerprint"]
    assert httpx.get(plan_url.replace("sig=", "sig=0")).status_code == 403
    listed = json.loads(hipp("jobs", "list", "--status", "succeeded", "--json", env=env).stdout)
    assert job_id in [j["id"] for j in listed["items"]]
    # a bad request comes back as one line that says what to fix, exit status 2
    bad = hipp("jobs", "submit", "--model", "tiny-llava", "--preference", "utility=-1", env=env, check=False)
    assert bad.returncode == 2 and "must be >= 0" in bad.stderr
    done = hipp("jobs", "cancel", job_id, env=env, check=False)
    assert done.returncode == 2 and "already succeeded" in done.stderr


def test_demo_the_readme_first_command(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = hipp("demo", "--home", str(home), "--eval-samples", "4", env=embedded_env(home))
    text = out.stdout
    assert "job succeeded" in text and "verified" in text and "loaded in a fresh process" in text
    metrics = json.loads(text[text.rindex("== metrics") + len("== metrics") :])
    assert metrics["parameters"] < metrics["dense_parameters"]
