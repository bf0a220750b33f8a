"""Running the service: ``hipp serve`` (API + worker in one command), ``hipp migrate``, ``hipp api-key``, and
``hipp demo`` (the README's first command: a whole job over HTTP against the embedded service).

With no ``HIPP_*`` settings, ``hipp serve`` is the embedded deployment: SQLite, the local artifact folder
served through signed URLs, and Celery's filesystem broker, all under ``HIPP_HOME`` (default ``.hipp``).
With Postgres/Redis/S3 settings it runs the same API and worker against them.

Stopping (SIGTERM or SIGINT, at any moment, also during start-up): the API stops accepting connections,
answers waiting long-polls, finishes requests in flight (at most ``GRACE_S``) and returns; the worker gets
SIGTERM at the signal (a warm shutdown: it finishes its task if it can), and ``WORKER_STOP_S`` after the signal
its whole process group (the worker, its pool child and the beat it started) is killed. Nothing outlives
``hipp serve``, and it exits 0 within about ``WORKER_STOP_S`` seconds. The processes themselves (worker
command, start and stop, the uvicorn server and supervisor) are in ``serve_processes``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.cli.serve_processes import celery_worker_command as celery_worker_command  # re-exported for tests
from worker.cli.serve_processes import (
    early_signals,
    remember_signals_during_startup,
    start_worker,
    stop_worker,
    uvicorn_server,
    uvicorn_supervisor,
)

GRACE_S = 5.0  # requests in flight get this long to finish after SIGTERM
WORKER_STOP_S = 6.0  # then the worker's process group is killed this long after the signal


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("serve", help="run the API and a worker (embedded default: no servers needed)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only")
    s.add_argument(
        "--api-processes", type=int, default=1, metavar="N", help="API processes on the port (the API image runs 2)"
    )
    s.add_argument(
        "--migrate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run migrations first (auto: only for SQLite; use `hipp migrate` as a release step)",
    )
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("migrate", help="upgrade the database schema (a release step)")
    m.set_defaults(func=cmd_migrate)

    k = sub.add_parser("api-key", help="manage API keys (stored hashed)")
    ks = k.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="create a key for a tenant (created if new); prints the key once")
    c.add_argument("--tenant", required=True)
    c.add_argument("--name", default="")
    c.set_defaults(func=cmd_key_create)
    r = ks.add_parser("revoke", help="revoke a key by its prefix (the part after hipp_)")
    r.add_argument("prefix")
    r.set_defaults(func=cmd_key_revoke)

    d = sub.add_parser("demo", help="start the embedded service, run a job over HTTP, verify and load the result")
    d.add_argument("--home", type=Path, default=None, help="state folder (default: $HIPP_HOME or .hipp)")
    d.add_argument("--model", default=None, help="default: testbed if installed, else tiny-llava")
    # The default is a preference whose plan keeps POPE within 2 points of the dense testbed's (README, "What a
    # preference does", from bench.control): the previous default (utility 0.5, compression 0.3) got a budget near
    # the policy's maximum and lost much of POPE.
    d.add_argument("--preference", default="utility=0.7,robustness=0.2,compression=0.1",
                   help="what the job trades (README: what a preference does)")
    d.add_argument("--out", type=Path, default=None, help="where to unpack the checkpoint")
    d.add_argument("--eval-samples", type=int, default=16, help="questions per benchmark split")
    d.add_argument("--recovery-steps", type=int, default=0, help="LoRA recovery steps (0: none)")
    d.set_defaults(func=cmd_demo)


def _settings() -> Any:
    from app.config import get_settings

    return get_settings()


def _migrate_if(settings: Any, mode: str) -> None:
    from app.migrate import upgrade

    url = settings.resolved_database_url
    if mode == "yes" or (mode == "auto" and url.startswith("sqlite")):
        upgrade(url)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    upgrade(_settings().resolved_database_url)
    print("database at head", file=sys.stderr)
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.security import create_api_key

    settings = _settings()
    _migrate_if(settings, "auto")
    with session_scope(settings.resolved_database_url) as session:
        key, tenant = create_api_key(session, args.tenant, args.name)
    print(f"created a key for tenant {tenant.name!r}; it is shown only once", file=sys.stderr)
    print(key)
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    from sqlalchemy import update

    from app.db import session_scope
    from app.models import ApiKey, utcnow

    with session_scope(_settings().resolved_database_url) as session:
        n = session.execute(update(ApiKey).where(ApiKey.prefix == args.prefix).values(revoked_at=utcnow())).rowcount  # type: ignore[attr-defined]
    if not n:
        print(f"hipp: error: no key with prefix {args.prefix!r}", file=sys.stderr)
        return 2
    print("revoked", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db import session_factory
    from app.main import create_app
    from app.queue import relay_pending

    remember_signals_during_startup()
    settings = _settings()
    worker = None
    server = None
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        _migrate_if(settings, args.migrate)
        if settings.storage == "local":
            settings.resolved_signing_secret  # noqa: B018  (create the key file once, before the worker starts)
        if not args.no_worker:
            worker = start_worker(settings)
            print(f"worker pid {worker.pid}, log {settings.home / 'worker.log'}", file=sys.stderr)
        relay_pending(settings, session_factory(settings.resolved_database_url), min_age_s=0)

        def on_signal() -> None:
            if worker is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

        if args.api_processes > 1:  # each process builds the app from the same HIPP_* environment
            config = uvicorn.Config(
                "app.main:create_app",
                factory=True,
                host=args.host,
                port=args.port,
                workers=args.api_processes,
                log_level="warning",
                timeout_graceful_shutdown=int(GRACE_S),
            )
            server = uvicorn_supervisor(config, on_signal)
        else:
            config = uvicorn.Config(
                create_app(settings),
                host=args.host,
                port=args.port,
                log_level="warning",
                timeout_graceful_shutdown=int(GRACE_S),
            )
            server = uvicorn_server(config, on_signal)
        if not early_signals:
            server.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if worker is not None:
            signalled = getattr(server, "signalled_at", None) or time.monotonic()
            stop_worker(worker, min(signalled, time.monotonic()) + WORKER_STOP_S)
    return 0


# --- the demo: what the README's first command runs --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until ``url``/readyz answers 200; a one-line SystemExit when ``proc`` exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hipp: error: the service exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"hipp: error: the service at {url} did not become ready in {timeout}s")


def default_model() -> str:
    from worker.hipp.models import builtin

    return "testbed" if (builtin.TESTBED_DIR / "config.json").is_file() else "tiny-llava"


def cmd_demo(args: argparse.Namespace) -> int:
    from hipp_client import HippClient
    from worker.cli.jobs import LOAD_SNIPPET, parse_preference, progress_printer

    home = (args.home or Path(os.environ.get("HIPP_HOME", ".hipp"))).resolve()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
    env.update(HIPP_HOME=str(home), HIPP_PUBLIC_URL=url)
    say = lambda msg: print(f"== {msg}", flush=True)  # noqa: E731
    cli = [sys.executable, "-m", "worker.cli"]

    say(f"setting up {home} (SQLite, local artifact store, filesystem broker)")
    key = subprocess.run(
        [*cli, "api-key", "create", "--tenant", "demo"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    say(f"starting the embedded service on {url}")
    server = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env)
    try:
        t0 = time.monotonic()
        wait_ready(url, server)
        client = HippClient(url, key)
        model = args.model or default_model()
        preference = parse_preference(args.preference)
        say(f"POST /jobs model={model} preference={preference}")
        job = client.submit_job(
            model,
            preference,
            # The demo shows the whole pipeline on any model: a tiny random-weight one is evaluated on the synthetic
            # world (its result says so) rather than not at all.
            evaluation={"max_samples": args.eval_samples, "world": True},
            recovery={"steps": args.recovery_steps},
        )
        say(f"job {job.id} queued; polling GET /jobs/{job.id}")
        job = client.wait(job.id, interval=0.3, on_update=progress_printer())
        for event in client.events(job.id):
            print(f"   {event.raw['created_at'][11:19]} [{event.stage or '-':<11}] {event.message}")
        if job.status != "succeeded" or job.result is None:
            print(json.dumps(job.raw.get("error"), indent=1))
            return 1
        result = job.result
        say(
            f"job succeeded in {time.monotonic() - t0:.1f}s (plan from {result['plan_source']}, "
            f"ran on {result.get('device', '?')})"
        )
        out = args.out or home / "demo" / job.id
        path = client.download(job.id, out)
        sha = result["checkpoint"]["sha256"]
        say(f"downloaded through the signed URL, sha256 {sha[:16]}... verified -> {path}")
        loaded = subprocess.run(
            [sys.executable, "-c", LOAD_SNIPPET, str(path)],
            capture_output=True,
            text=True,
            env={k: v for k, v in env.items() if not k.startswith("HIPP_")},
        )
        if loaded.returncode != 0:
            print(loaded.stderr[-2000:], file=sys.stderr)
            return 1
        info = json.loads(loaded.stdout.strip().splitlines()[-1])
        say(f"loaded in a fresh process: {info['class']}, {info['parameters']:,} parameters, plan {info['plan']}")
        say("metrics")
        print(json.dumps(result["metrics"], indent=1))
        return 0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.cli.serve ...``: these commands and ``jobs`` alone, for the API image (no torch),
    where the full ``hipp`` parser (whose engine commands may import torch) is not needed."""
    from worker.cli import jobs

    parser = argparse.ArgumentParser(prog="hipp")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    jobs.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
