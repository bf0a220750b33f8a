"""Tables (SQLAlchemy 2 declarative). What the API speaks lives apart, in app/schemas.py.

Postgres owns job state; Celery only delivers work. A job row carries everything the reliability design needs:
``attempt``/``max_attempts`` (capped retries), ``lease_owner``/``lease_expires_at``/``heartbeat_at`` (claiming
and the reaper), ``enqueued_at`` (the outbox: a queued job with no enqueue time is re-sent by the relay),
``idempotency_key``/``request_hash`` and ``stage_outputs`` (object-storage keys of finished stages, for
resuming).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

BigIntPK = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


def utcnow() -> datetime:
    return datetime.now(UTC)


class Tz(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on Postgres and SQLite (which drops the offset: we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


TERMINAL = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
STAGES = ("load", "sensitivity", "plan", "prune", "recover", "evaluate", "upload")


class JobKind(enum.StrEnum):
    """What a job does: prune a model (POST /jobs), or train a policy for one (POST /policies with ``train``)."""

    prune = "prune"
    train_policy = "train_policy"


#: The stages of a policy-training job: load the model, set up the plan search (policy state, criterion scores,
#: the search set's evaluator), plan-level GRPO, register the trained policy.
TRAIN_STAGES = ("load", "search_setup", "train", "register")
#: Each kind's stages, in order.
KIND_STAGES = {JobKind.prune.value: STAGES, JobKind.train_policy.value: TRAIN_STAGES}
#: The artifact that keeps every plan a job considered, in full, in the order of ``GET /jobs/{id}/plans``: what
#: a later job's ``plan: {job, index}`` replays.
PLANS_ARTIFACT = "hipp_plans.json"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)


class ApiKey(Base):
    """An API key: ``hipp_<prefix>_<secret>``. Only the prefix (for lookup) and a SHA-256 hash are stored."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.prune.value, server_default=JobKind.prune.value)
    model: Mapped[str] = mapped_column(String(500))
    preference: Mapped[dict[str, float]] = mapped_column(JSON)
    target_sparsity: Mapped[float | None] = mapped_column(Float, nullable=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    stage_progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)

    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)

    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    stage_outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Tz(), nullable=True)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)


class PolicyStatus(enum.StrEnum):
    """A registered policy is ``ready`` at once; one trained by the service is ``training`` until its job ends
    (``ready`` when it succeeded, else ``failed`` or ``cancelled``)."""

    training = "training"
    ready = "ready"
    failed = "failed"
    cancelled = "cancelled"


class Policy(Base):
    """A trained HiPP-Prune policy for a model (by reference) or a model fingerprint: registered by ``uri``, or
    trained by the service (``job_id``: the ``train_policy`` job, ``train``: its options; ``uri`` is set,
    ``store:policies/<id>``, when the job succeeds)."""

    __tablename__ = "policies"
    __table_args__ = (
        Index("ix_policies_tenant_model", "tenant_id", "model"),
        Index("ix_policies_job_id", "job_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(500))
    fingerprint: Mapped[str | None] = mapped_column(String(128), nullable=True)
    uri: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    status: Mapped[str] = mapped_column(
        String(16), default=PolicyStatus.ready.value, server_default=PolicyStatus.ready.value
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", name="fk_policies_job_id"), nullable=True
    )
    train: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)


class DatasetState(enum.StrEnum):
    uploading = "uploading"
    validating = "validating"
    ready = "ready"
    invalid = "invalid"


DATASET_KINDS = ("images", "pope", "scienceqa", "conversations")


class Dataset(Base):
    """A tenant's data set: an archive in the store (uploaded under ``prefix``, or an ``s3://`` object of the
    deployment's bucket it references), checked by the ``hipp.validate_dataset`` task with the engine's
    loaders. ``counts`` and ``sha256``/``size`` are what validation found; ``reasons`` why it is invalid."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=DatasetState.uploading.value)
    source: Mapped[str] = mapped_column(String(16))  # upload | s3
    prefix: Mapped[str] = mapped_column(String(500))  # every object the service writes for it lives here
    key: Mapped[str] = mapped_column(String(1000))  # the archive's storage key
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Tz(), default=utcnow, onupdate=utcnow)
