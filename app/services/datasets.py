"""Dataset operations behind the routes: create (an upload or an ``s3://`` reference), take a direct upload,
mark the upload complete (-> ``validating``, the validation task enqueued by the route), read, list with a
cursor, delete.

Every query is scoped to the caller's tenant; another tenant's data set is indistinguishable from a missing
one. Everything the service stores for a data set lives under ``datasets/{tenant}/{id}/``; an ``s3://``
reference is only read, never written or deleted.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Text, and_, cast, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ApiError, not_found
from app.models import Dataset, DatasetState, Job, JobStatus, utcnow
from app.schemas import DatasetComplete, DatasetCreate
from app.security import Principal
from app.services.jobs import decode_cursor, encode_cursor
from app.storage import Storage, StorageError, check_key

ARCHIVE_NAME = "archive"
ACTIVE_JOB_STATES = (JobStatus.queued.value, JobStatus.running.value, JobStatus.cancelling.value)


def dataset_prefix(tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> str:
    return f"datasets/{tenant_id}/{dataset_id}/"


def key_from_s3_uri(uri: str, settings: Settings) -> str:
    """The store key of an ``s3://`` URI in the deployment's bucket (under its ``HIPP_S3_PREFIX``), else 422."""
    if settings.storage != "s3":
        raise ApiError(
            422,
            "invalid_s3_uri",
            "source.s3_uri: this deployment keeps its files in a local folder, not S3; upload the archive instead "
            '(source {"upload": true})',
        )
    bucket, prefix = settings.s3_bucket, settings.s3_prefix.strip("/")
    expected = f"s3://{bucket}/{prefix + '/' if prefix else ''}"
    if not uri.startswith(expected) or len(uri) == len(expected):
        raise ApiError(
            422,
            "invalid_s3_uri",
            f"source.s3_uri: only objects in this deployment's bucket can be referenced: {expected}<key> "
            f"(got {uri[:200]!r}); upload the archive otherwise",
        )
    try:
        return check_key(uri[len(expected):])
    except ValueError as exc:
        raise ApiError(
            422, "invalid_s3_uri", f"source.s3_uri: {exc} (no '.', '..' or empty segments); name an object such as "
            f"{expected}data/archive.tar"
        ) from None


def new_dataset(settings: Settings, who: Principal, body: DatasetCreate) -> Dataset:
    """The data set ``body`` asks for, not saved yet (the route saves it once its upload target exists, so a
    store outage leaves no row behind)."""
    if body.size is not None and body.size > settings.dataset_upload_max_bytes:
        raise ApiError(
            422,
            "invalid_request",
            f"size: the archive is {body.size} bytes, more than the {settings.dataset_upload_max_bytes} a data set "
            "may hold (HIPP_DATASET_UPLOAD_MAX_BYTES); split it into several data sets",
        )
    ident = uuid.uuid4()
    prefix = dataset_prefix(who.tenant_id, ident)
    if body.source.s3_uri is not None:
        key, source = key_from_s3_uri(body.source.s3_uri, settings), "s3"
    else:
        key, source = prefix + ARCHIVE_NAME, "upload"
    dataset = Dataset(
        id=ident, tenant_id=who.tenant_id, kind=body.kind, name=body.name, source=source, prefix=prefix, key=key,
        state=DatasetState.uploading.value if source == "upload" else DatasetState.validating.value,
        counts={}, reasons=[],
    )
    return dataset


def save_dataset(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.commit()
    return dataset


def get_dataset(session: Session, who: Principal, dataset_id: uuid.UUID) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == who.tenant_id))
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def _require_uploading(dataset: Dataset, action: str) -> None:
    if dataset.state != DatasetState.uploading.value:
        raise ApiError(
            409,
            "dataset_not_uploading",
            f"dataset {dataset.id} is {dataset.state}; {action} only while it is uploading (create a new data set "
            "to upload another archive)",
            detail={"state": dataset.state},
        )


def store_direct_upload(storage: Storage, dataset: Dataset, path: Path) -> None:
    """Put a directly uploaded archive (already on disk, size-capped by the route) at the data set's key."""
    _require_uploading(dataset, "an archive can be uploaded")
    storage.put_file(dataset.key, path)


def complete_upload(
    session: Session, storage: Storage, who: Principal, dataset_id: uuid.UUID, body: DatasetComplete | None = None
) -> Dataset:
    """uploading -> validating once the archive is in the store (the route then enqueues validation); a
    multipart upload's parts are joined first."""
    dataset = get_dataset(session, who, dataset_id)
    _require_uploading(dataset, "the upload can be completed")
    if body is not None:
        join_parts(storage, dataset, body)
    if not storage.exists(dataset.key):
        raise ApiError(
            409,
            "archive_missing",
            f"dataset {dataset.id} has no archive yet: PUT it to the upload URL (or PUT /datasets/{dataset.id}/archive)"
            " before completing",
        )
    res = session.execute(
        update(Dataset)
        .where(Dataset.id == dataset.id, Dataset.state == DatasetState.uploading.value)
        .values(state=DatasetState.validating.value, updated_at=utcnow())
    )
    session.commit()
    session.refresh(dataset)
    if not res.rowcount:  # type: ignore[attr-defined]
        _require_uploading(dataset, "the upload can be completed")
    return dataset


def join_parts(storage: Storage, dataset: Dataset, body: DatasetComplete) -> None:
    numbers = [p.number for p in body.parts]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ApiError(422, "invalid_request", "parts: list every part once, in order, numbered from 1")
    try:
        storage.complete_multipart(dataset.key, body.upload_id, [(p.number, p.etag) for p in body.parts])
    except StorageError as exc:
        raise ApiError(
            422,
            "invalid_upload_parts",
            f"the multipart upload of dataset {dataset.id} could not be completed ({exc}); upload every part to its "
            "URL and send each part's ETag with the upload_id POST /datasets answered",
        ) from None


def list_datasets(session: Session, who: Principal, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
    """Newest first; keyset pagination on (created_at, id), as GET /jobs."""
    q = select(Dataset).where(Dataset.tenant_id == who.tenant_id)
    if cursor:
        ts, ident = decode_cursor(cursor)
        q = q.where(or_(Dataset.created_at < ts, and_(Dataset.created_at == ts, Dataset.id < ident)))
    rows = list(session.scalars(q.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return page, next_cursor


def jobs_using(session: Session, who: Principal, dataset_id: uuid.UUID) -> list[uuid.UUID]:
    """The tenant's queued or running jobs whose ``options["data"]`` names the data set (any value under
    ``data`` that holds the id: ``calibration``, ``recovery``, ``evaluation.pope`` ... are references with an
    ``id``, see app/services/job_data.py)."""
    rows = session.execute(
        select(Job.id, Job.options).where(
            Job.tenant_id == who.tenant_id,
            Job.status.in_(ACTIVE_JOB_STATES),
            cast(Job.options, Text).contains(str(dataset_id)),
        )
    ).all()
    return [r.id for r in rows if str(dataset_id) in _text_of((r.options or {}).get("data"))]


def _text_of(value: Any) -> str:
    return json.dumps(value) if value is not None else ""


def delete_dataset(session: Session, storage: Storage, who: Principal, dataset_id: uuid.UUID) -> None:
    """Delete the row and what the service stored under the data set's prefix (an ``s3://`` reference itself
    is the tenant's object and stays). 409 while an active job uses it."""
    dataset = get_dataset(session, who, dataset_id)
    using = jobs_using(session, who, dataset.id)
    if using:
        raise ApiError(
            409,
            "dataset_in_use",
            f"dataset {dataset.id} is used by {len(using)} queued or running job(s); cancel them or wait until "
            "they end, then delete it",
            detail={"jobs": [str(j) for j in using]},
        )
    storage.delete_prefix(dataset.prefix)
    session.delete(dataset)
    session.commit()
