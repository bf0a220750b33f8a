"""Liveness (``/healthz``), readiness (``/readyz``: database, broker, storage) and Prometheus ``/metrics``
(job counts of all tenants only for a scraper holding ``HIPP_METRICS_TOKEN``)."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from app.deps import BrokerDep, DbRoute, SessionDep, SettingsDep, StorageDep
from app.errors import ApiError, error_body
from app.metrics import JOB_REGISTRY, JOBS_BY_STATUS, OLDEST_QUEUED
from app.models import Job, JobStatus
from app.schemas import Health

router = APIRouter(tags=["health"], route_class=DbRoute)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (no dependencies checked)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "A dependency is down"}})
def readyz(session: SessionDep, broker: BrokerDep, storage: StorageDep) -> Response:
    """Database, broker and storage all answer."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}: {exc}"[:300]
    try:
        with broker.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}: {exc}"[:300]
    try:
        storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {type(exc).__name__}: {exc}"[:300]
    failed = [k for k, v in checks.items() if v != "ok"]
    if failed:
        body = error_body("not_ready", f"not ready: {', '.join(failed)} unavailable", checks)
        return JSONResponse(body, status_code=503)
    return JSONResponse(Health(status="ok", checks=checks).model_dump())


@router.get("/metrics", include_in_schema=False)
def metrics(
    session: SessionDep, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> Response:
    """Request metrics for anyone; job counts (all tenants) only with ``Authorization: Bearer
    <HIPP_METRICS_TOKEN>``. With a token configured, the whole endpoint needs it."""
    token = settings.metrics_token
    if token:
        sent = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), token.encode()):
            raise ApiError(
                401,
                "invalid_metrics_token",
                "/metrics needs 'Authorization: Bearer <HIPP_METRICS_TOKEN>' (the scraper's token, not an API key)",
                headers={"WWW-Authenticate": "Bearer"},
            )
    body = generate_latest()
    if not token:
        return Response(body, media_type=CONTENT_TYPE_LATEST)
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    for s in JobStatus:
        JOBS_BY_STATUS.labels(s.value).set(counts.get(s.value, 0))
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.queued.value))
    if isinstance(oldest, datetime):
        oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
        OLDEST_QUEUED.set((datetime.now(UTC) - oldest).total_seconds())
    else:
        OLDEST_QUEUED.set(0)
    return Response(body + generate_latest(JOB_REGISTRY), media_type=CONTENT_TYPE_LATEST)
