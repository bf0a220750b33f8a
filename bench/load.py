"""Load: hundreds of clients polling jobs, a steady rate of submits and cancels, event reads, long-polls, and
SIGTERM under that load; for the embedded deployment (SQLite + filesystem broker) and for Postgres + Redis.

Each mode starts the API alone (``hipp serve --no-worker``, one uvicorn process) on 127.0.0.1 and runs, from
one asyncio client process (a minimal HTTP/1.1 client, one
keep-alive connection per simulated client) on the same machine:

1. ``poll``: N pollers, each ``GET /jobs/{id}`` then a pause of ``--interval`` s (as ``hipp jobs wait`` did
   before long-polls), every ``--events-every``-th poll also ``GET /jobs/{id}/events``;
2. ``poll+submit``: the same, plus ``POST /jobs`` at ``--submit-rate``/s and ``POST /jobs/{id}/cancel`` at
   ``--cancel-rate``/s (open loop: a slow answer does not slow the rate);
3. ``longpoll``: N clients in ``GET /jobs/{id}?wait=`` loops beside 20 plain pollers (latency of the plain
   ones while N requests wait);
4. ``stop``: SIGTERM to the API under the ``poll+submit`` load; then the same for ``hipp serve`` with its worker
   (and beat): seconds from the signal to the exit, what the clients saw, and whether any process is left.

Errors: any answer other than the expected 2xx, and any transport error (timeouts included), before SIGTERM.

    python -m bench.load                                  # both modes, 60 s phases -> bench/results/load.{json,md}
    python -m bench.load --modes embedded --duration 10   # a quick look (writes load.json/.md too)
"""
# Here: the phases, SIGTERM under load and the command line (the docstring above is the --help text); the
# servers are in bench/load_servers.py, the clients in bench/load_clients.py, the report in bench/load_report.py.

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.load_clients import BODY, drive
from bench.load_report import verdicts, write_md
from bench.load_servers import ROOT, Mode, alive, cpu_seconds, descendants, loadavg, machine

sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def seed_jobs(url: str, key: str, n: int) -> list[str]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    out = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        for _ in range(n):
            r = c.post("/jobs", json=BODY)
            r.raise_for_status()
            out.append(r.json()["id"])
    return out


def stop_under_load(mode: Mode, args: argparse.Namespace, jobs: list[str], *serve_args: str) -> dict[str, Any]:
    """SIGTERM to a server while the poll+submit load runs: seconds to exit, what clients saw, processes left."""
    proc, url = mode.serve(*serve_args)
    if "--no-worker" not in serve_args:  # wait for the worker, its pool child and its beat
        deadline = time.monotonic() + 60
        while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
    family = descendants(proc.pid)
    timing: dict[str, float] = {}

    def sigterm() -> None:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        timing["exit_s"] = time.monotonic() - t0
        deadline = time.monotonic() + 3
        while alive(family) and time.monotonic() < deadline:
            time.sleep(0.1)

    pollers = args.pollers_postgres if mode.name == "postgres" else args.pollers_embedded
    rec, measured = asyncio.run(
        drive(
            url, mode.key, jobs, pollers=pollers, duration=0, interval=args.interval,
            events_every=args.events_every, submit_rate=args.submit_rate, cancel_rate=args.cancel_rate,
            on_time=(args.stop_after, sigterm),
        )
    )  # fmt: skip
    s = rec.summary(measured)
    return {
        "command": " ".join(["hipp serve", *serve_args]),
        "load_before_signal_s": round(measured, 1),
        "requests_before_signal": s["all"].get("requests", 0),
        "errors_before_signal": s["all"]["errors"],
        "codes_before_signal": {k: v["codes"] for k, v in s["kinds"].items()},
        "exit_s": round(timing.get("exit_s", float("nan")), 2),
        "exit_code": proc.returncode,
        "processes_started": 1 + len(family),
        "processes_left": alive([proc.pid, *family]),
        "clients_during_shutdown": s["after_signal"],
    }


def run_mode(mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    pollers = args.pollers_postgres if mode.name == "postgres" else args.pollers_embedded
    out: dict[str, Any] = {"pollers": pollers, "phases": {}}
    proc, url = mode.serve("--no-worker")
    try:
        jobs = seed_jobs(url, mode.key, args.jobs)
        common = {"interval": args.interval, "events_every": args.events_every, "warmup": args.warmup}
        phases: list[tuple[str, dict[str, Any]]] = [
            ("poll", {"pollers": pollers, "duration": args.duration}),
            ("poll+submit", {"pollers": pollers, "duration": args.duration, "submit_rate": args.submit_rate,
                             "cancel_rate": args.cancel_rate}),
        ]  # fmt: skip
        if args.long_pollers:
            phases.append(
                ("longpoll", {"pollers": 20, "duration": min(args.duration, 30), "long_pollers": args.long_pollers})
            )
        for name, kw in phases:
            la0, c0, me0 = loadavg(), cpu_seconds(proc.pid), sum(os.times()[:2])
            rec, measured = asyncio.run(drive(url, mode.key, jobs, **common, **kw))
            s = rec.summary(measured)
            s.update(
                seconds=round(measured, 1),
                server_cpu_s=round(cpu_seconds(proc.pid) - c0, 1),
                client_cpu_s=round(sum(os.times()[:2]) - me0, 1),
                load_average_before=la0,
                load_average_after=loadavg(),
                **{k: v for k, v in kw.items() if k not in ("duration", "warmup")},
            )
            out["phases"][name] = s
            a = s["all"]
            print(f"[{mode.name}] {name}: {a.get('rps')} req/s p50 {a.get('p50_ms')} ms p99 {a.get('p99_ms')} ms "
                  f"errors {a['errors']} (load {s['load_average_after']})", flush=True)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    out["stop_api"] = stop_under_load(mode, args, jobs, "--no-worker")
    print(f"[{mode.name}] stop (API): {out['stop_api']['exit_s']} s, left {out['stop_api']['processes_left']}")
    if not args.skip_worker_stop:
        out["stop_serve"] = stop_under_load(mode, args, jobs)
        print(f"[{mode.name}] stop (serve + worker): {out['stop_serve']['exit_s']} s, "
              f"left {out['stop_serve']['processes_left']}")  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="embedded,postgres")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--pollers-postgres", type=int, default=300)
    ap.add_argument("--pollers-embedded", type=int, default=200)
    ap.add_argument("--interval", type=float, default=1.0, help="a poller's pause after each answer")
    ap.add_argument("--events-every", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=50, help="distinct jobs the pollers follow")
    ap.add_argument("--submit-rate", type=float, default=10.0)
    ap.add_argument("--cancel-rate", type=float, default=2.0)
    ap.add_argument("--long-pollers", type=int, default=300)
    ap.add_argument("--long-wait", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before a phase is measured")
    ap.add_argument("--stop-after", type=float, default=10.0, help="seconds of load before SIGTERM")
    ap.add_argument("--skip-worker-stop", action="store_true", help="skip SIGTERM to hipp serve with its worker")
    ap.add_argument("--api-threads", type=int, default=None, help="HIPP_API_THREADS of the API (default: its own)")
    ap.add_argument("--api-processes", type=int, default=1, help="hipp serve --api-processes (uvicorn workers)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="load", help="result files: OUT/NAME.json and OUT/NAME.md")
    ap.add_argument("--md-only", action="store_true", help="rewrite OUT/NAME.md from OUT/NAME.json, run nothing")
    args = ap.parse_args()
    if args.md_only:
        res = json.loads((args.out / f"{args.name}.json").read_text())
        write_md(res, args.out / f"{args.name}.md")
        return 0
    pg = os.environ.get("HIPP_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    rd = os.environ.get("HIPP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    command = "python -m bench.load " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res: dict[str, Any] = {
        "command": command.strip(),
        "machine": machine(),
        "load_average_start": loadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "name", "md_only")},
        "modes": {},
    }
    for name in [m.strip() for m in args.modes.split(",") if m.strip()]:
        mode = Mode(name, pg, rd, args.api_threads, args.api_processes)
        try:
            res["modes"][name] = run_mode(mode, args)
        finally:
            mode.cleanup()
    res["load_average_end"] = loadavg()
    res["targets"] = verdicts(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, args.out / f"{args.name}.md")
    print("\n".join(res["targets"]))
    print(f"wrote {args.out / args.name}.json and .md; reproduce with: {command.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
