"""Prometheus metrics: request counts and latencies per route template, job submissions, and (at scrape
time, from the database, only for a scraper that presents ``HIPP_METRICS_TOKEN``) jobs by status and the age
of the oldest queued job."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("hipp_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "hipp_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_SUBMITTED = Counter("hipp_jobs_submitted_total", "Jobs accepted by POST /jobs")
# Job counts cover every tenant: they live in their own registry, served only with HIPP_METRICS_TOKEN.
JOB_REGISTRY = CollectorRegistry()
JOBS_BY_STATUS = Gauge("hipp_jobs", "Jobs by status (all tenants)", ["status"], registry=JOB_REGISTRY)
OLDEST_QUEUED = Gauge(
    "hipp_oldest_queued_job_age_seconds", "Age of the oldest queued job", registry=JOB_REGISTRY
)


BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class MetricsAndLimits:
    """Pure ASGI middleware (cheap per request): rejects bodies over ``max_body`` bytes with 413 (by their
    ``Content-Length``, or counted while reading a chunked body), bodies that are not JSON with 415 (naming
    the ``Content-Type`` header), both in the API's error shape; and records request count and latency by
    route template.

    ``uploads`` names the few ``PUT`` paths whose body is a file (a data set archive): they take any content
    type, up to their own byte limit (by ``Content-Length`` here; the route counts a chunked body itself)."""

    def __init__(self, app: Any, max_body: int, uploads: Sequence[tuple[re.Pattern[str], int]] = ()) -> None:
        self.app = app
        self.max_body = max_body
        self.uploads = tuple(uploads)

    def upload_limit(self, scope: dict[str, Any]) -> int | None:
        if scope.get("method") != "PUT":
            return None
        path = scope.get("path", "")
        return next((limit for pattern, limit in self.uploads if pattern.fullmatch(path)), None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        length: int | None = None
        content_type = ""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = self.max_body + 1
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        if b"%00" in scope.get("query_string", b"") or "\x00" in scope.get("path", ""):
            # Postgres cannot compare or store NUL: refuse it in the URL, like in the body.
            await self._reject(send, 422, "invalid_request", "the URL (path or query) must not contain NUL (%00)")
            self._observe(scope, 422, start)
            return
        upload_limit = self.upload_limit(scope)
        if upload_limit is not None:
            if length is not None and length > upload_limit:
                await self._reject(send, *self._upload_too_large(upload_limit))
                self._observe(scope, 413, start)
                return
            await self._forward(scope, receive, send, start, upload_limit, self._upload_too_large(upload_limit))
            return
        if length is not None and length > self.max_body:
            await self._reject(send, *self._too_large())
            self._observe(scope, 413, start)
            return
        if scope.get("method") in BODY_METHODS and length is None:
            # Chunked (no Content-Length): read it here, at most max_body bytes, then hand it on.
            buffered = await self._read_limited(receive)
            if buffered is None:
                await self._reject(send, *self._too_large())
                self._observe(scope, 413, start)
                return
            length = len(buffered)
            receive = _replay(buffered, receive)
        if scope.get("method") in BODY_METHODS and length and not _is_json(content_type):
            shown = content_type or "none"
            await self._reject(
                send,
                415,
                "unsupported_media_type",
                f"the request body must be JSON: send the header 'Content-Type: application/json' "
                f"(got Content-Type: {shown[:100]})",
            )
            self._observe(scope, 415, start)
            return
        await self._forward(scope, receive, send, start, self.max_body, self._too_large())

    async def _forward(
        self, scope: dict[str, Any], receive: Any, send: Any, start: float, limit: int, too_large: tuple[int, str, str]
    ) -> None:
        """Run the app, counting the body it reads against ``limit`` (``too_large``: the answer past it)."""
        status_holder = {"status": 500}
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except _BodyTooLarge:
            await self._reject(send, *too_large)
            status_holder["status"] = 413
        self._observe(scope, status_holder["status"], start)

    async def _read_limited(self, receive: Any) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> tuple[int, str, str]:
        return (
            413,
            "body_too_large",
            f"request body is larger than {self.max_body} bytes; send a smaller body "
            "(metadata is meant for a few labels, not data)",
        )

    @staticmethod
    def _upload_too_large(limit: int) -> tuple[int, str, str]:
        return 413, "body_too_large", f"the file is larger than {limit} bytes, the most this upload takes"

    def _observe(self, scope: dict[str, Any], status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        HTTP_REQUESTS.labels(method, path, str(status)).inc()
        HTTP_LATENCY.labels(method, path).observe(time.perf_counter() - start)

    async def _reject(self, send: Any, status: int, code: str, message: str) -> None:
        import json

        from app.errors import error_body

        body = json.dumps(error_body(code, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # type: ignore[no-any-return]

    return replay


class _BodyTooLarge(Exception):
    pass
