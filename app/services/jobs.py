"""Job operations behind the routes: create (idempotent; a ``plan`` reference to an earlier job checked here,
the data sets a job names in ``app/services/job_data.py``),
read, list with a cursor, cancel, events, artifacts.

Every query is scoped to the caller's tenant; another tenant's job is indistinguishable from a missing one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ApiError, not_found
from app.modelrefs import check_model_ref
from app.models import PLANS_ARTIFACT, TERMINAL, Artifact, Event, Job, JobStatus, utcnow
from app.schemas import JobCreate
from app.security import Principal
from app.services.job_data import resolve_job_data

FINISHED_STATES = {s.value for s in TERMINAL}


def request_hash(body: JobCreate) -> str:
    data = body.model_dump(mode="json")
    for name in ("plan", "data"):  # requests from before plan replay / job data existed keep their hash
        if data.get(name) is None:
            data.pop(name, None)
    if not data.get("evaluation", {}).get("world", True):
        data["evaluation"].pop("world")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def create_job(
    session: Session,
    settings: Settings,
    locks: TenantLocks,
    who: Principal,
    body: JobCreate,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Insert a queued job (the tenant's submissions serialized by ``locks``). Returns (job, created);
    ``created`` is False for an idempotent replay."""
    model = check_model_ref(body.model, settings)
    digest = request_hash(body)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 200 characters")
        existing = _by_idempotency_key(session, who, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False
    source = replayed_plan(session, who, body, model)  # after the replay: its plan's job may be gone by now
    data = resolve_job_data(session, who, body, model)
    with locks.hold(session, who):
        return _insert(session, settings, who, body, model, source, data, digest, idempotency_key)


def replayed_plan(session: Session, who: Principal, body: JobCreate, model: str) -> PlanSource | None:
    """The earlier job and plan that ``body.plan`` names, checked: the tenant's own job (another tenant's is
    answered as a missing one), succeeded, with its plans kept, ``index`` among them, on the same model."""
    ref = body.plan
    if ref is None:
        return None
    source = session.scalar(select(Job).where(Job.id == ref.job, Job.tenant_id == who.tenant_id))
    if source is None:
        raise _bad_plan(f"plan.job: job {ref.job} does not exist (or belongs to another tenant); name one of your "
                        "succeeded jobs (GET /jobs?status=succeeded)", ref.job)
    if source.status != JobStatus.succeeded.value:
        wait = "wait until it has succeeded" if source.status not in FINISHED_STATES else "use a succeeded job"
        raise ApiError(
            409, "plan_job_not_succeeded",
            f"plan.job: job {source.id} is {source.status}, only a succeeded job's plans can be replayed; {wait}",
            detail={"job": str(source.id), "status": source.status},
        )
    plans = (source.result or {}).get("plans") or []
    kept = session.scalar(select(Artifact).where(Artifact.job_id == source.id, Artifact.name == PLANS_ARTIFACT))
    if kept is None:
        raise _bad_plan(f"plan.job: job {source.id} has no stored plans (it ran before plans were kept, or its "
                        "artifacts expired); submit a job that searches again (preference without plan)", ref.job)
    if ref.index >= len(plans):
        raise _bad_plan(f"plan.index: job {source.id} considered {len(plans)} plan(s), so index must be 0 to "
                        f"{len(plans) - 1} (see GET /jobs/{source.id}/plans)", ref.job)
    if source.model != model:
        raise _bad_plan(f"model: plan {ref.index} of job {source.id} is for model {source.model!r}, not {model!r}; "
                        "a plan fits one model's geometry, so submit the same model", ref.job)
    fingerprint = str((plans[ref.index].get("plan") or {}).get("fingerprint", ""))
    return PlanSource(source, ref.index, fingerprint)


def _bad_plan(message: str, job: uuid.UUID) -> ApiError:
    return ApiError(422, "invalid_plan_reference", message, detail={"job": str(job)})


@dataclass(frozen=True)
class PlanSource:
    """A checked ``plan`` reference: the job whose front holds it, its index there, its fingerprint."""

    job: Job
    index: int
    fingerprint: str

    def option(self) -> dict[str, Any]:
        """What the worker reads (``options["plan"]``)."""
        return {"job": str(self.job.id), "index": self.index, "fingerprint": self.fingerprint}


def _insert(
    session: Session, settings: Settings, who: Principal, body: JobCreate, model: str, source: PlanSource | None,
    data: dict[str, Any] | None, digest: str, idempotency_key: str | None,
) -> tuple[Job, bool]:
    check_quota(session, settings, who)
    options: dict[str, Any] = {
        "recovery": body.recovery.model_dump(),
        "evaluation": body.evaluation.model_dump(),
        "calibration": body.calibration.model_dump(),
        "export": body.export.model_dump(),
    }
    if source is not None:
        options["plan"] = source.option()
    if data is not None:
        options["data"] = data
    if body.preference is not None:
        preference = body.preference.model_dump()
    else:  # a replayed plan records the preference it was chosen for (the schema requires one of the two)
        assert source is not None
        preference = dict(source.job.preference)
    job = Job(
        id=uuid.uuid4(),
        tenant_id=who.tenant_id,
        model=model,
        preference=preference,
        target_sparsity=body.target_sparsity,
        options=options,
        meta=body.metadata,
        status=JobStatus.queued.value,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=digest,
        stage_outputs={},
    )
    session.add(job)
    try:
        session.commit()  # one INSERT; the "job enqueued" event is written by the dispatcher, in its batch
    except IntegrityError:
        session.rollback()
        existing = _by_idempotency_key(session, who, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key or ""), False
    return job, True


class TenantLocks:
    """Serializes one tenant's submissions from the quota check to the commit of the INSERT (one per API
    runtime, app/runtime.py).

    Postgres: a transaction-scoped advisory lock (taken in ``check_quota``); nothing here. SQLite: the write
    lock taken up front (``BEGIN IMMEDIATE``, so a second submission waits instead of counting the same active
    jobs), plus a per-tenant lock in this process for drivers that already opened the transaction."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[uuid.UUID, threading.Lock] = {}

    @contextmanager
    def hold(self, session: Session, who: Principal) -> Iterator[None]:
        if session.get_bind().dialect.name != "sqlite":
            yield
            return
        with self._guard:
            lock = self._locks.setdefault(who.tenant_id, threading.Lock())
        with lock:
            conn = session.connection()
            raw = conn.connection.dbapi_connection
            if raw is not None and not getattr(raw, "in_transaction", True):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield


ACTIVE = (JobStatus.queued.value, JobStatus.running.value, JobStatus.cancelling.value)


def check_quota(session: Session, settings: Settings, who: Principal) -> None:
    """At most ``max_active_jobs_per_tenant`` queued, running or cancelling jobs per tenant (429 beyond).

    On Postgres a transaction-scoped advisory lock per tenant serializes concurrent submissions of one
    tenant (held until the INSERT commits), so the limit holds exactly under concurrency."""
    limit = settings.max_active_jobs_per_tenant
    if limit <= 0:
        return
    if session.get_bind().dialect.name == "postgresql":
        lock = int.from_bytes(who.tenant_id.bytes[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == who.tenant_id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= limit:
        session.rollback()
        raise ApiError(
            429,
            "quota_exceeded",
            f"this tenant already has {active} active jobs (queued, running or cancelling) and the limit is "
            f"{limit}; wait for one to finish or cancel one, then retry",
            detail={"active": active, "limit": limit},
            headers={"Retry-After": "30"},
        )


def _by_idempotency_key(session: Session, who: Principal, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == who.tenant_id, Job.idempotency_key == key))


def _replay(job: Job, digest: str, key: str) -> Job:
    if job.request_hash != digest:
        raise ApiError(
            409,
            "idempotency_key_reused",
            f"Idempotency-Key {key!r} was already used for a different request (job {job.id}); "
            "use a new key for a new job",
            detail={"job_id": str(job.id)},
        )
    return job


def get_job(session: Session, who: Principal, job_id: uuid.UUID) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == who.tenant_id))
    if job is None:
        raise not_found("job", job_id)
    return job


def encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, ident = raw.split("|", 1)
        return datetime.fromisoformat(ts), uuid.UUID(ident)
    except Exception as exc:
        raise ApiError(
            400, "invalid_cursor", "cursor is not one this API returned; pass next_cursor from the last page"
        ) from exc


def list_jobs(
    session: Session, who: Principal, statuses: list[JobStatus] | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """Newest first; keyset pagination on (created_at, id)."""
    q = select(Job).where(Job.tenant_id == who.tenant_id)
    if statuses:
        q = q.where(Job.status.in_([s.value for s in statuses]))
    if cursor:
        ts, ident = decode_cursor(cursor)
        q = q.where(or_(Job.created_at < ts, and_(Job.created_at == ts, Job.id < ident)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return page, next_cursor


def cancel_job(session: Session, who: Principal, job_id: uuid.UUID) -> Job:
    """queued -> cancelled at once; running -> cancelling (the worker stops at its next check)."""
    job = get_job(session, who, job_id)
    now = utcnow()
    for source, target in (
        (JobStatus.queued, JobStatus.cancelled),
        (JobStatus.running, JobStatus.cancelling),
    ):
        values: dict[str, Any] = {"status": target.value, "cancel_requested_at": now, "updated_at": now}
        if target is JobStatus.cancelled:
            values["finished_at"] = now
        res = session.execute(update(Job).where(Job.id == job.id, Job.status == source.value).values(**values))
        if res.rowcount:  # type: ignore[attr-defined]
            session.add(Event(job_id=job.id, stage=job.stage, message=f"cancel requested ({target.value})"))
            if target is JobStatus.cancelled:
                from app.services.policies import end_training  # it imports this module

                end_training(session, job.id, target.value)  # a queued policy training: its policy too
            session.commit()
            session.refresh(job)
            return job
    session.refresh(job)
    if job.status in (JobStatus.cancelling.value, JobStatus.cancelled.value):
        return job
    raise ApiError(
        409,
        "job_finished",
        f"job {job.id} already {job.status}; only queued or running jobs can be cancelled",
        detail={"status": job.status},
    )


def list_events(
    session: Session, who: Principal, job_id: uuid.UUID, after: int | None, limit: int
) -> tuple[list[Event], str | None]:
    get_job(session, who, job_id)
    q = select(Event).where(Event.job_id == job_id)
    if after is not None:
        q = q.where(Event.id > after)
    rows = list(session.scalars(q.order_by(Event.id).limit(limit + 1)))
    page = rows[:limit]
    return page, (str(page[-1].id) if len(rows) > limit else None)


def list_artifacts(session: Session, who: Principal, job_id: uuid.UUID) -> list[Artifact]:
    get_job(session, who, job_id)
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))
