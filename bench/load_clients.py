"""bench.load's clients: a minimal HTTP/1.1 keep-alive connection per simulated client, the recorder of
latencies and answers, and :func:`drive`, which runs pollers, long-pollers, submits and cancels for a phase."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from typing import Any

BODY = {"model": "tiny-llava", "preference": {"utility": 0.5, "robustness": 0.2, "compression": 0.3}}
EXPECTED = {"poll": (200,), "events": (200,), "submit": (201,), "cancel": (202,), "longpoll": (200, 304)}
KEEPALIVE_S = 4.0  # a client reuses a connection idle for less than this (uvicorn keeps idle ones 5 s)


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
