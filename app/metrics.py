"""Prometheus metrics: request counts and latencies per route template, job submissions, and (at scrape
time, from the database) jobs by status and the age of the oldest queued job."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("hipp_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "hipp_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_SUBMITTED = Counter("hipp_jobs_submitted_total", "Jobs accepted by POST /jobs")
JOBS_BY_STATUS = Gauge("hipp_jobs", "Jobs by status (all tenants)", ["status"])
OLDEST_QUEUED = Gauge("hipp_oldest_queued_job_age_seconds", "Age of the oldest queued job")


class MetricsAndLimits:
    """Pure ASGI middleware (cheap per request): rejects bodies over ``max_body`` bytes with 413 in the
    API's error shape, and records request count and latency by route template."""

    def __init__(self, app: Any, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_holder = {"status": 500}
        too_large = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_body
                except ValueError:
                    too_large = True
                break
        if too_large:
            await self._reject(send)
            self._observe(scope, 413, start)
            return

        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except _BodyTooLarge:
            await self._reject(send)
            status_holder["status"] = 413
        self._observe(scope, status_holder["status"], start)

    def _observe(self, scope: dict[str, Any], status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        HTTP_REQUESTS.labels(method, path, str(status)).inc()
        HTTP_LATENCY.labels(method, path).observe(time.perf_counter() - start)

    async def _reject(self, send: Any) -> None:
        import json

        from app.errors import error_body

        body = json.dumps(
            error_body(
                "body_too_large",
                f"request body is larger than {self.max_body} bytes; send a smaller body "
                "(metadata is meant for a few labels, not data)",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
