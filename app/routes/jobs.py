"""Jobs: submit, read, list, cancel, and a job's events, artifacts and plans."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.responses import RedirectResponse
from sqlalchemy import delete

from app import watch
from app.deps import (
    CurrentTenant,
    DbRoute,
    DispatcherDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantLocksDep,
    WatcherDep,
    rate_limit,
    run_db,
)
from app.errors import ApiError
from app.metrics import JOBS_SUBMITTED
from app.models import TERMINAL, Job, JobStatus
from app.retention import FINISHED, delete_job_files
from app.schemas import ArtifactOut, EventOut, JobCreate, JobOut, Page, PlanOut
from app.services import jobs as service

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=DbRoute)
MAX_EVENT_ID = 2**63 - 1  # event ids are BIGINT
TERMINAL_STATES = {s.value for s in TERMINAL}


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=JobOut, dependencies=[Depends(rate_limit("submit"))]
)
def submit_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    locks: TenantLocksDep,
    dispatcher: DispatcherDep,
    who: CurrentTenant,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Job:
    """Queue a pruning job. Poll ``GET /jobs/{id}``; a repeated ``Idempotency-Key`` returns the same job."""
    job, created = service.create_job(session, settings, locks, who, body, idempotency_key)
    response.headers["Location"] = f"/jobs/{job.id}"
    if created:
        JOBS_SUBMITTED.inc()
        # Enqueue only after the row is committed (create_job commits); the relay covers a failed publish.
        dispatcher.submit(job.id)
    else:
        response.status_code = status.HTTP_200_OK
    return job


@router.get("", response_model=Page[JobOut])
def list_jobs(
    session: ReadSessionDep,
    settings: SettingsDep,
    who: CurrentTenant,
    status_: Annotated[list[JobStatus] | None, Query(alias="status", description="Repeat to OR")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> Page[JobOut]:
    """The tenant's jobs, newest first. Follow ``next_cursor`` until it is null."""
    if limit > settings.page_size_max:
        raise ApiError(422, "invalid_request", f"limit: at most {settings.page_size_max} per page")
    jobs, next_cursor = service.list_jobs(session, who, status_, limit, cursor)
    return Page[JobOut](items=[JobOut.model_validate(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses={304: {"description": "Unchanged (If-None-Match)"}})
async def get_job(
    job_id: uuid.UUID,
    response: Response,
    session: ReadSessionDep,
    settings: SettingsDep,
    watcher: WatcherDep,
    who: CurrentTenant,
    wait: Annotated[
        float,
        Query(description="Long-poll: answer as soon as the job changes, or after this many seconds"),
    ] = 0.0,
    if_none_match: Annotated[str | None, Header(description="ETag of the state you have")] = None,
) -> Any:
    """A job. With ``?wait=S`` the answer comes when its status, stage or progress differs from the state you
    last saw (``If-None-Match``: that response's ``ETag``; else the state when the request arrives), or after
    S seconds; a finished job is answered at once. Unchanged with ``If-None-Match``: 304."""
    if not 0 <= wait <= settings.long_poll_max_s:
        raise ApiError(
            422,
            "invalid_request",
            f"wait: must be between 0 and {settings.long_poll_max_s:g} seconds (got {wait:g}); "
            "poll again with the job's ETag as If-None-Match to wait longer",
        )
    # The row goes straight to the response model (validated once, from attributes).
    job = await run_db(session, service.get_job, session, who, job_id)
    tag = watch.job_etag(job)
    unchanged = not if_none_match or watch.matches(if_none_match, tag)  # since the state the client has
    if wait > 0 and unchanged and job.status not in TERMINAL_STATES:
        await watcher.wait(job.id, tag, wait)
        job = await run_db(session, service.get_job, session, who, job_id)
        tag = watch.job_etag(job)
    if watch.matches(if_none_match, tag):
        return Response(status_code=304, headers={"ETag": tag})
    response.headers["ETag"] = tag
    return job


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(rate_limit("cancel"))],
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, who: CurrentTenant) -> JobOut:
    """Queued jobs are cancelled at once; running jobs become ``cancelling`` and stop at the next check."""
    return JobOut.model_validate(service.cancel_job(session, who, job_id))


@router.get("/{job_id}/events", response_model=Page[EventOut])
async def list_events(
    job_id: uuid.UUID,
    session: ReadSessionDep,
    who: CurrentTenant,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="Only events with a larger id")] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Page[EventOut]:
    if cursor is not None:
        after = int(cursor) if cursor.isascii() and cursor.isdigit() and len(cursor) <= 19 else -1
        if not 0 <= after <= MAX_EVENT_ID:
            raise ApiError(400, "invalid_cursor", "cursor must be a next_cursor value from this API")
    # Async with the query in a worker thread: one thread hop per read, not two (the serializer's).
    events, next_cursor = await run_db(session, service.list_events, session, who, job_id, after, limit)
    return Page[EventOut](items=[EventOut.model_validate(e) for e in events], next_cursor=next_cursor)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(
    job_id: uuid.UUID,
    session: ReadSessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    who: CurrentTenant,
) -> list[ArtifactOut]:
    """Artifacts with signed download URLs minted for this response (they expire; ask again)."""
    out = []
    for a in service.list_artifacts(session, who, job_id):
        url, expires_at = storage.signed_url(a.key, a.name, settings.url_expiry_s)
        out.append(
            ArtifactOut(
                id=a.id,
                kind=a.kind,
                name=a.name,
                size=a.size,
                sha256=a.sha256,
                content_type=a.content_type,
                url=url,
                expires_at=expires_at,
            )
        )
    return out


@router.get("/{job_id}/artifacts/{name}", status_code=307, response_class=RedirectResponse)
def download_artifact(
    job_id: uuid.UUID,
    name: str,
    session: ReadSessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    who: CurrentTenant,
) -> RedirectResponse:
    """Redirect to a freshly signed URL for one artifact."""
    for a in service.list_artifacts(session, who, job_id):
        if a.name == name:
            url, _ = storage.signed_url(a.key, a.name, settings.url_expiry_s)
            return RedirectResponse(url, status_code=307, headers={"X-Checksum-Sha256": a.sha256})
    raise ApiError(404, "not_found", f"job {job_id} has no artifact {name!r}; list them at /jobs/{job_id}/artifacts")


@router.get("/{job_id}/plans", response_model=list[PlanOut])
def list_plans(job_id: uuid.UUID, session: ReadSessionDep, who: CurrentTenant) -> list[PlanOut]:
    """The plans the job considered (the non-dominated set), the chosen one flagged. Empty until planned. A
    plan's position in this list is the ``index`` a later job's ``plan: {job, index}`` replays."""
    job = service.get_job(session, who, job_id)
    plans = (job.result or {}).get("plans") or []
    return [PlanOut.model_validate(p) for p in plans]


@router.delete("/{job_id}", status_code=204, response_class=Response)
def delete_job(
    job_id: uuid.UUID, session: SessionDep, settings: SettingsDep, storage: StorageDep, who: CurrentTenant
) -> Response:
    """Delete a finished job: its files (checkpoint, plan, metrics, any stage outputs) and its row, with its
    events and artifacts. A job still queued or running is 409 ``job_active``: cancel it first."""
    job = service.get_job(session, who, job_id)
    if job.status not in FINISHED:
        raise ApiError(
            409,
            "job_active",
            f"job {job.id} is {job.status}; cancel it (POST /jobs/{job.id}/cancel) and delete it once it has ended",
            detail={"status": job.status},
        )
    delete_job_files(storage, job.id)
    session.execute(delete(Job).where(Job.id == job.id, Job.status.in_(FINISHED)))
    session.commit()
    return Response(status_code=204)
