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

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from worker.cli.serve import wait_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
BODY = {"model": "tiny-llava", "preference": {"utility": 0.5, "robustness": 0.2, "compression": 0.3}}
EXPECTED = {"poll": (200,), "events": (200,), "submit": (201,), "cancel": (202,), "longpoll": (200, 304)}
HOST = "127.0.0.1"  # load goes to this machine only
KEEPALIVE_S = 4.0  # a client reuses a connection idle for less than this (uvicorn keeps idle ones 5 s)


# --- the machine and the servers ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a server and its processes (the API processes under ``--api-processes``)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Mode:
    """One deployment's settings (as HIPP_* variables) and its database, created here and dropped at the end."""

    def __init__(
        self, name: str, pg_url: str, redis_url: str, api_threads: int | None = None, api_processes: int = 1
    ) -> None:
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix=f"hipp-load-{name}-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HIPP_")}
        self.env.update(
            HIPP_HOME=str(self.home),
            HIPP_SIGNING_SECRET="bench-load",
            HIPP_MAX_ACTIVE_JOBS_PER_TENANT="0",  # the bench submits far more than the per-tenant quota
            HIPP_RATE_LIMIT_PER_MINUTE="0",  # and faster than the per-tenant rate limit
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if api_threads:
            self.env["HIPP_API_THREADS"] = str(api_threads)
        self.api_processes = api_processes
        self.db_name: str | None = None
        self.pg_admin = pg_url
        self.redis_url = redis_url
        if name == "postgres":
            from sqlalchemy import create_engine, make_url, text

            self.db_name = f"hipp_load_{uuid.uuid4().hex[:8]}"
            admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{self.db_name}"'))
            admin.dispose()
            self.db_url = make_url(pg_url).set(database=self.db_name).render_as_string(hide_password=False)
            tag = self.db_name
            self.env.update(
                HIPP_DATABASE_URL=self.db_url,
                HIPP_BROKER_URL=redis_url,
                HIPP_GPU_QUEUE=f"gpu-{tag}",
                HIPP_DEFAULT_QUEUE=f"default-{tag}",
            )
        else:
            self.db_url = f"sqlite:///{self.home / 'hipp.db'}"
        from app.db import session_scope
        from app.migrate import upgrade
        from app.security import create_api_key

        upgrade(self.db_url)
        with session_scope(self.db_url) as s:
            self.key, _ = create_api_key(s, "bench-load")

    def serve(self, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
        extra = (*extra, "--api-processes", str(self.api_processes))
        port = free_port()
        url = f"http://{HOST}:{port}"
        env = dict(self.env, HIPP_PUBLIC_URL=url)
        log = (self.home / "serve.log").open("ab")
        cmd = [sys.executable, "-m", "worker.cli.serve", "serve", "--host", HOST, "--port", str(port), *extra]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        wait_ready(url, proc, timeout=90)
        return proc, url

    def cleanup(self) -> None:
        import shutil

        from app.db import dispose_all

        dispose_all()
        shutil.rmtree(self.home, ignore_errors=True)
        if self.db_name:
            import redis
            from sqlalchemy import create_engine, text

            r = redis.Redis.from_url(self.redis_url)
            for key in r.scan_iter(match=f"*{self.db_name}*"):
                r.delete(key)
            admin = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()


# --- the clients ------------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = collections.defaultdict(list)
        self.codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.errors: dict[str, int] = collections.Counter()
        self.after_signal: collections.Counter[str] = collections.Counter()
        self.signalled_at: float | None = None
        self.record_from = 0.0  # perf_counter: answers to requests started before this are not counted

    def add(self, kind: str, started: float, code: int | str) -> None:
        if started < self.record_from:
            return
        if self.signalled_at is not None and time.perf_counter() >= self.signalled_at:
            self.after_signal[f"{kind}:{code}"] += 1  # what clients saw during the shutdown, kept apart
            return
        self.lat[kind].append(time.perf_counter() - started)
        self.codes[kind][str(code)] += 1
        if code not in EXPECTED[kind]:
            self.errors[kind] += 1

    def summary(self, seconds: float) -> dict[str, Any]:
        def stats(lat: list[float]) -> dict[str, Any]:
            lat = sorted(lat)
            if not lat:
                return {"requests": 0}
            pick = lambda q: round(1000 * lat[min(int(q * len(lat)), len(lat) - 1)], 1)  # noqa: E731
            return {"requests": len(lat), "rps": round(len(lat) / seconds, 1), "p50_ms": pick(0.5),
                    "p99_ms": pick(0.99), "max_ms": round(1000 * lat[-1], 1)}  # fmt: skip

        kinds = {k: {**stats(v), "errors": self.errors[k], "codes": dict(self.codes[k])} for k, v in self.lat.items()}
        short = [x for k, v in self.lat.items() if k != "longpoll" for x in v]
        return {
            "all": {**stats(short), "errors": sum(self.errors.values())},
            "kinds": kinds,
            "after_signal": dict(self.after_signal),
        }


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection (one per simulated client, like a real poller): a few
    microseconds of CPU per request, where httpx spent more CPU than the server it measured."""

    def __init__(self, host: str, port: int, auth: str) -> None:
        self.host, self.port = host, port
        self.prefix = f"Host: {host}:{port}\r\nAuthorization: Bearer {auth}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used_at = 0.0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: str = "", timeout: float = 30
    ) -> Reply:
        try:
            async with asyncio.timeout(timeout):
                return await self._request(method, path, body, headers)
        except BaseException:
            self.close()
            raise

    async def _request(self, method: str, path: str, body: bytes | None, headers: str) -> Reply:
        stale = time.monotonic() - self.used_at > KEEPALIVE_S
        if stale or self.writer is None or self.reader is None or self.reader.at_eof() or self.writer.is_closing():
            # Like any HTTP client: no request on a keep-alive connection the server closed or may be closing
            # right now (uvicorn closes idle ones after 5 s: a request sent then is lost in the race).
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body is not None else ""
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.prefix}{headers}{extra}\r\n".encode() + (body or b""))
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        data = b""
        if "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                data += await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        if fields.get("connection", "").lower() == "close":
            self.close()
        self.used_at = time.monotonic()
        return Reply(status, fields, data)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "ConnectError"
    if isinstance(exc, TimeoutError):
        return "Timeout"
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionResetError | BrokenPipeError):
        return "Disconnected"
    return type(exc).__name__


async def drive(
    url: str,
    key: str,
    jobs: list[str],
    *,
    pollers: int,
    duration: float,
    interval: float,
    events_every: int,
    submit_rate: float = 0.0,
    cancel_rate: float = 0.0,
    long_pollers: int = 0,
    long_wait: float = 10.0,
    on_time: tuple[float, Any] | None = None,
    warmup: float = 0.0,
) -> tuple[Recorder, float]:
    """Run the clients for ``warmup`` + ``duration`` seconds, counting the last ``duration`` (or, with
    ``on_time=(t, fn)``, call ``fn()`` at ``t`` and run until it returns, plus a second). Returns the recorder
    and the measured seconds (before any signal)."""
    rec = Recorder()
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    submitted: collections.deque[str] = collections.deque()
    tasks: set[asyncio.Task[Any]] = set()
    idle: list[Connection] = []  # connections of the submitting/cancelling clients
    body = json.dumps(BODY).encode()

    async def call(
        conn: Connection, kind: str, method: str, path: str, data: bytes | None = None, headers: str = ""
    ) -> Reply | None:
        t0 = time.perf_counter()
        try:
            r = await conn.request(method, path, data, headers, timeout=long_wait + 30 if kind == "longpoll" else 30)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            rec.add(kind, t0, error_name(exc))
            return None
        rec.add(kind, t0, r.status_code)
        return r

    async def poller(job: str) -> None:
        conn = Connection(host, int(port), key)
        await asyncio.sleep(random.uniform(0, interval))
        n = 0
        try:
            while not stop.is_set():
                await call(conn, "poll", "GET", f"/jobs/{job}")
                n += 1
                if events_every and n % events_every == 0:
                    await call(conn, "events", "GET", f"/jobs/{job}/events")
                await asyncio.sleep(interval)
        finally:
            conn.close()

    async def long_poller(job: str) -> None:
        conn = Connection(host, int(port), key)
        await asyncio.sleep(random.uniform(0, 1))
        tag = None
        try:
            while not stop.is_set():
                hdrs = f"If-None-Match: {tag}\r\n" if tag else ""
                r = await call(conn, "longpoll", "GET", f"/jobs/{job}?wait={long_wait:g}", headers=hdrs)
                if r is None:
                    await asyncio.sleep(1)
                else:
                    tag = r.headers.get("etag", tag)
        finally:
            conn.close()

    async def with_connection(fn: Any) -> None:
        conn = idle.pop() if idle else Connection(host, int(port), key)
        try:
            await fn(conn)
        finally:
            idle.append(conn)

    async def submit(conn: Connection) -> None:
        r = await call(conn, "submit", "POST", "/jobs", body)
        if r is not None and r.status_code == 201:
            submitted.append(r.json()["id"])

    async def cancel(conn: Connection) -> None:
        if submitted:
            await call(conn, "cancel", "POST", f"/jobs/{submitted.popleft()}/cancel", b"")

    async def every(rate: float, fn: Any) -> None:
        if rate <= 0:
            return
        next_t = loop.time() + random.uniform(0, 1 / rate)
        while not stop.is_set():
            await asyncio.sleep(max(next_t - loop.time(), 0))
            task = loop.create_task(with_connection(fn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_t += 1 / rate

    workers = [loop.create_task(poller(jobs[i % len(jobs)])) for i in range(pollers)]
    workers += [loop.create_task(long_poller(jobs[(i * 7) % len(jobs)])) for i in range(long_pollers)]
    workers += [loop.create_task(every(submit_rate, submit)), loop.create_task(every(cancel_rate, cancel))]
    rec.record_from = time.perf_counter() + warmup
    await asyncio.sleep(warmup)
    start = time.perf_counter()
    measured = duration
    if on_time is None:
        await asyncio.sleep(duration)
    else:
        at, fn = on_time
        await asyncio.sleep(at)
        rec.signalled_at = time.perf_counter()
        measured = rec.signalled_at - start
        await loop.run_in_executor(None, fn)
        await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait(workers + list(tasks), timeout=long_wait + 35)
    for t in workers + list(tasks):
        t.cancel()
    for conn in idle:
        conn.close()
    return rec, measured


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


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
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


# --- the report -------------------------------------------------------------------------------------------------
TARGETS = {"postgres": 500.0, "embedded": 1000.0}


def verdicts(res: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in res["modes"].items():
        p = m["phases"].get("poll", {}).get("all", {})
        ps = m["phases"].get("poll+submit", {}).get("all", {})
        target = TARGETS[name]
        ok = p.get("errors") == 0 and p.get("p99_ms", 1e9) < target
        lines.append(
            f"- {name}, {m['pollers']} pollers: errors {p.get('errors')}, p99 {p.get('p99_ms')} ms "
            f"(target 0 errors, p99 < {target:g} ms): **{'met' if ok else 'missed'}**"
        )
        lines.append(
            f"- {name}, with {res['settings']['submit_rate']:g} submits/s and {res['settings']['cancel_rate']:g} "
            f"cancels/s: errors {ps.get('errors')} (target 0): **{'met' if ps.get('errors') == 0 else 'missed'}**"
            f"; p99 {ps.get('p99_ms')} ms"
        )
        for key, label in (("stop_api", "API"), ("stop_serve", "hipp serve + worker + beat")):
            st = m.get(key)
            if st:
                ok = st["exit_s"] < 10 and not st["processes_left"] and st["exit_code"] == 0
                lines.append(
                    f"- {name}, SIGTERM to {label} under load: exit in {st['exit_s']} s (code {st['exit_code']}), "
                    f"processes left {len(st['processes_left'])} (target < 10 s, none): **{'met' if ok else 'missed'}**"
                )
    return lines


def write_md(res: dict[str, Any], path: Path) -> None:
    s = res["settings"]
    lines = [
        "# bench/load",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {res['machine']['memory_gib']} GiB, "
        f"{res['machine']['os']}, Python {res['machine']['python']}. The API (`hipp serve --no-worker "
        f"--api-processes {s['api_processes']}`: uvicorn, {s['api_processes']} process(es)), the database and "
        "the load generator (one asyncio process, one keep-alive "
        f"connection per client) share these cores; load average at the start {res['load_average_start']}, "
        f"at the end {res['load_average_end']}.",
        "",
        f"Clients: each poller `GET /jobs/{{id}}`, then waits {s['interval']:g} s (every {s['events_every']}th poll "
        f"also reads the job's events); {s['jobs']} jobs polled; `poll+submit` adds {s['submit_rate']:g} "
        f"`POST /jobs`/s and {s['cancel_rate']:g} cancels/s; `longpoll`: {s['long_pollers']} clients in "
        f"`?wait={s['long_wait']:g}` loops beside 20 plain pollers (whose figures the row shows). "
        f"Phases of {s['duration']:g} s, measured after {s['warmup']:g} s of the same load (connections opened, "
        "keys cached). Errors: anything but the expected 2xx/304, transport errors included.",
        "",
        "| mode | phase | pollers | req/s | p50 ms | p99 ms | max ms | errors | server CPU s | load avg after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["modes"].items():
        for phase, ph in m["phases"].items():
            a = ph["all"]
            lines.append(
                f"| {name} | {phase} | {ph['pollers']} | {a.get('rps')} | {a.get('p50_ms')} | {a.get('p99_ms')} | "
                f"{a.get('max_ms')} | {a['errors']} | {ph['server_cpu_s']} | {ph['load_average_after'][0]} |"
            )
    lines += ["", "Per request kind:", "", "| mode | phase | kind | requests | p50 ms | p99 ms | errors | codes |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in res["modes"].items():
        for phase, ph in m["phases"].items():
            for kind, k in ph["kinds"].items():
                lines.append(
                    f"| {name} | {phase} | {kind} | {k.get('requests')} | {k.get('p50_ms')} | {k.get('p99_ms')} | "
                    f"{k['errors']} | {k['codes']} |"
                )
    lines += ["", "SIGTERM under the `poll+submit` load (after "
              f"{s['stop_after']:g} s of it):", "",
              "| mode | server | exit after SIGTERM s | exit code | processes left | errors before the signal | "
              "what clients saw from the signal on |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in res["modes"].items():
        for key in ("stop_api", "stop_serve"):
            st = m.get(key)
            if st:
                lines.append(
                    f"| {name} | `{st['command']}` ({st['processes_started']} processes) | {st['exit_s']} | "
                    f"{st['exit_code']} | {len(st['processes_left'])} | {st['errors_before_signal']} | "
                    f"{st['clients_during_shutdown']} |"
                )
    lines += ["", "Targets (issue 21):", "", *verdicts(res), "", "Where the time went (CPU):", ""]
    for name, m in res["modes"].items():
        for phase in ("poll", "poll+submit"):
            ph = m["phases"].get(phase)
            if not ph:
                continue
            wall = ph["seconds"] + s.get("warmup", 0)
            n = ph["all"].get("requests", 0) * wall / max(ph["seconds"], 1e-9)
            lines.append(
                f"- {name} {phase}: the API processes used {ph['server_cpu_s'] / wall:.2f} of the "
                f"{res['machine']['cores']} cores ({1000 * ph['server_cpu_s'] / max(n, 1):.1f} ms of CPU per request), "
                f"the load generator {ph['client_cpu_s'] / wall:.2f}; load average {ph['load_average_before'][0]} -> "
                f"{ph['load_average_after'][0]} (the rest: the database, and whatever else ran on the machine)"
            )
    if res.get("notes"):
        lines += ["", *res["notes"]]
    lines += ["", f"Reproduce: `{res['command']}`", ""]
    path.write_text("\n".join(lines))


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
