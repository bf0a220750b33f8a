"""API overhead and end-to-end job time.

1. Throughput and latency of ``GET /jobs/{id}`` and ``POST /jobs`` (Postgres + Redis when reachable, else the
   embedded SQLite/filesystem setup), each against a bare FastAPI endpoint served the same way in the same
   run (same uvicorn settings, same client, same concurrency). Ratio = API throughput / bare throughput;
   target >= 0.5.
2. Wall time of a whole job through the API on the embedded service (``hipp serve``): POST -> succeeded,
   then download + sha256 check, on ``testbed`` when installed, else ``tiny-llava``. Target <= 60 s on 2
   cores with a short recovery.

    python bench/api.py                 # writes bench/results/api.{json,md}
    python bench/api.py --duration 3    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREFERENCE = {"utility": 0.5, "robustness": 0.2, "compression": 0.3}

BARE_APP = """
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()

class Body(BaseModel):
    model: str
    preference: dict[str, float]

@app.get("/bare/{item_id}")
def get_item(item_id: str) -> dict:
    return {"id": item_id, "status": "queued", "progress": 0.0}

@app.post("/bare", status_code=201)
def post_item(body: Body) -> dict:
    return {"id": "x", "model": body.model, "preference": body.preference}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(target: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", target, "--port", str(port), "--log-level", "warning", "--no-access-log"]
    if target.endswith("create_app"):
        cmd.append("--factory")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/openapi.json", proc)
    return proc, url


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(
    method: str, url: str, headers: dict[str, str], body: Any, duration: float, concurrency: int
) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for _ in range(20):  # warm-up
            await client.request(method, url, headers=headers, json=body)
        end = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = await client.request(method, url, headers=headers, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code >= 400:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), to report server CPU per request: a figure that other
    load on the machine disturbs much less than throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(proc: subprocess.Popen[bytes], *args: Any) -> dict[str, float]:
    c0 = cpu_seconds(proc.pid)
    result = asyncio.run(load(*args))
    result["server_cpu_ms_per_req"] = round(1000 * (cpu_seconds(proc.pid) - c0) / max(result["requests"], 1), 3)
    return result


def pg_and_redis() -> tuple[str, str] | None:
    pg = os.environ.get("HIPP_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    rd = os.environ.get("HIPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis
        from sqlalchemy import create_engine, text

        redis.Redis.from_url(rd, socket_timeout=1).ping()
        with create_engine(pg).connect() as c:
            c.execute(text("SELECT 1"))
        return pg, rd
    except Exception:
        return None


def bench_http(duration: float, concurrency: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, make_url, text

    from app.db import session_scope
    from app.migrate import upgrade
    from app.security import create_api_key

    tmp = Path(tempfile.mkdtemp(prefix="hipp-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
    # The POST benchmark submits far more jobs than the per-tenant active-job quota allows.
    env.update(HIPP_HOME=str(tmp), HIPP_SIGNING_SECRET="bench", HIPP_MAX_ACTIVE_JOBS_PER_TENANT="0")
    backing = pg_and_redis()
    admin = db_name = None
    if backing:
        pg, rd = backing
        db_name = f"hipp_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{db_name}"'))
        db_url = make_url(pg).set(database=db_name).render_as_string(hide_password=False)
        env.update(HIPP_DATABASE_URL=db_url, HIPP_BROKER_URL=rd, HIPP_GPU_QUEUE=f"bench-{db_name}")
        setup = "postgres + redis"
    else:
        db_url = f"sqlite:///{tmp / 'hipp.db'}"
        setup = "sqlite + filesystem broker"
    upgrade(db_url)
    with session_scope(db_url) as s:
        key, _ = create_api_key(s, "bench")
    (tmp / "bare_app.py").write_text(BARE_APP)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "tiny-llava", "preference": PREFERENCE}
    results: dict[str, Any] = {"setup": setup, "concurrency": concurrency, "duration_s": duration}
    bare, bare_url = serve("bare_app:app", env, tmp)
    api, api_url = serve("app.main:create_app", env, ROOT)
    try:
        import httpx

        job_id = httpx.post(f"{api_url}/jobs", json=body, headers=headers).json()["id"]
        d, c = duration, concurrency
        results["get_bare"] = measured(bare, "GET", f"{bare_url}/bare/{job_id}", {}, None, d, c)
        results["get_job"] = measured(api, "GET", f"{api_url}/jobs/{job_id}", headers, None, d, c)
        results["post_bare"] = measured(bare, "POST", f"{bare_url}/bare", {}, body, d, c)
        results["post_jobs"] = measured(api, "POST", f"{api_url}/jobs", headers, body, d, c)
    finally:
        stop(api)
        stop(bare)
        from app.db import dispose_all

        dispose_all()
        if admin is not None:
            import redis

            redis.Redis.from_url(env["HIPP_BROKER_URL"]).delete(env["HIPP_GPU_QUEUE"])
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    results["ratio_get"] = round(results["get_job"]["rps"] / results["get_bare"]["rps"], 3)
    results["ratio_post"] = round(results["post_jobs"]["rps"] / results["post_bare"]["rps"], 3)
    for kind, api_key, bare_key in (("get", "get_job", "get_bare"), ("post", "post_jobs", "post_bare")):
        results[f"cpu_ratio_{kind}"] = round(
            results[bare_key]["server_cpu_ms_per_req"] / max(results[api_key]["server_cpu_ms_per_req"], 1e-9), 3
        )
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return results


def bench_job(recovery_steps: int) -> dict[str, Any]:
    """A whole job through the embedded service: POST -> succeeded -> download + sha256."""
    from hipp_client import HippClient
    from worker.cli.serve import default_model

    tmp = Path(tempfile.mkdtemp(prefix="hipp-bench-job-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
    env.update(HIPP_HOME=str(tmp), HIPP_PUBLIC_URL=url, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cli = [sys.executable, "-m", "worker.cli"]
    key = subprocess.run(
        [*cli, "api-key", "create", "--tenant", "bench"], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    server = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, cwd=ROOT)
    try:
        wait_http(url + "/readyz", server)
        client = HippClient(url, key)
        model = default_model()
        t0 = time.perf_counter()
        job = client.submit_job(model, PREFERENCE, recovery={"steps": recovery_steps})
        job = client.wait(job.id, interval=0.2, timeout=600)
        t_done = time.perf_counter() - t0
        path = client.download(job.id, tmp / "out")
        t_total = time.perf_counter() - t0
        stages = (job.result or {}).get("stages", {})
        return {
            "model": model,
            "status": job.status,
            "recovery_steps": recovery_steps,
            "submit_to_succeeded_s": round(t_done, 2),
            "with_download_and_sha256_s": round(t_total, 2),
            "stages": stages,
            "checkpoint": str(path.name),
        }
    finally:
        stop(server)


def write_md(res: dict[str, Any], path: Path) -> None:
    h = res["http"]
    lines = [
        "# API benchmark (bench/api.py)",
        "",
        f"Machine: {res['machine']}. Setup: {h['setup']}; uvicorn, 1 process; client: httpx async, "
        f"concurrency {h['concurrency']}, {h['duration_s']} s per endpoint, same machine as the server.",
        "",
        f"Load average on the machine during the run (other work shares it): {h['load_average']}.",
        "",
        "| endpoint | req/s | p50 ms | p99 ms | errors | server CPU ms/req |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("get_bare", "bare GET"),
        ("get_job", "GET /jobs/{id}"),
        ("post_bare", "bare POST"),
        ("post_jobs", "POST /jobs"),
    ):
        r = h[name]
        cpu = r["server_cpu_ms_per_req"]
        lines.append(f"| {label} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {cpu} |")
    lines += [
        "",
        f"Throughput ratio (API / bare): GET {h['ratio_get']}, POST {h['ratio_post']} (target >= 0.5).",
        f"Server-CPU ratio (bare CPU per request / API CPU per request): GET {h['cpu_ratio_get']}, "
        f"POST {h['cpu_ratio_post']}.",
        "",
    ]
    j = res.get("job")
    if j:
        lines += [
            f"Whole job through the embedded service ({j['model']}, recovery steps {j['recovery_steps']}): "
            f"POST -> succeeded {j['submit_to_succeeded_s']} s; with download + sha256 "
            f"{j['with_download_and_sha256_s']} s (target <= 60 s). Status: {j['status']}.",
            "",
            "| stage | status | seconds / reason |",
            "|---|---|---|",
        ]
        for stage, info in j["stages"].items():
            lines.append(f"| {stage} | {info['status']} | {info.get('seconds', info.get('reason', ''))} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--recovery-steps", type=int, default=0)
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"}
    res["http"] = bench_http(args.duration, args.concurrency)
    print(json.dumps(res["http"], indent=1))
    if not args.skip_job:
        res["job"] = bench_job(args.recovery_steps)
        print(json.dumps(res["job"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api.json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, args.out / "api.md")
    print(f"wrote {args.out / 'api.json'} and {args.out / 'api.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
