"""Datasets: a tenant's data set archives (calibration images, POPE, ScienceQA, LLaVA conversations), uploaded
through a signed URL or directly, or referenced in the deployment's bucket, then validated by a worker task."""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from celery import Celery
from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import (
    BrokerDep,
    CurrentTenant,
    DbRoute,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    run_db,
)
from app.errors import ApiError
from app.models import Dataset, DatasetState
from app.queue import publish_dataset_validation
from app.routes.files import receive_to_file
from app.schemas import DatasetComplete, DatasetCreate, DatasetOut, Page, UploadPart, UploadTarget
from app.security import Principal
from app.services import datasets as service
from app.storage import Storage

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=DbRoute)
log = logging.getLogger("hipp.api")

ARCHIVE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def enqueue_validation(session: Session, settings: Settings, broker: Celery, dataset: Dataset) -> None:
    """Publish the validation task. When the broker refuses, answer 503 and leave nothing half-done: an upload
    goes back to ``uploading`` (complete it again), an ``s3://`` reference is forgotten (create it again)."""
    try:
        publish_dataset_validation(settings, dataset.id, broker)
    except Exception as exc:
        log.warning("could not enqueue validation of dataset %s: %s", dataset.id, exc)
        if dataset.source == "upload":
            dataset.state = DatasetState.uploading.value
            retry = f"POST /datasets/{dataset.id}/complete again"
        else:
            session.delete(dataset)
            retry = "POST /datasets again"
        session.commit()
        raise ApiError(
            503,
            "queue_unavailable",
            f"the validation of dataset {dataset.id} could not be queued (the broker is unavailable); {retry} in a "
            "few seconds",
            headers={"Retry-After": "5"},
        ) from None


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def create_dataset(
    body: DatasetCreate,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    broker: BrokerDep,
    who: CurrentTenant,
    response: Response,
) -> DatasetOut:
    """Create a data set. ``source {"upload": true}``: the answer's ``upload.url`` takes one PUT of the archive
    (tar, tar.gz or zip), then ``POST /datasets/{id}/complete``; small archives can go to
    ``PUT /datasets/{id}/archive`` instead. ``source {"s3_uri"}``: an archive in the deployment's bucket,
    validated at once. Validation moves the data set to ``ready`` or ``invalid`` (with ``reasons``)."""
    dataset = service.new_dataset(settings, who, body)
    # The upload target first: a store that does not answer fails the request before anything is saved.
    upload = upload_target(settings, storage, dataset.key, body.size) if dataset.source == "upload" else None
    service.save_dataset(session, dataset)
    response.headers["Location"] = f"/datasets/{dataset.id}"
    out = DatasetOut.model_validate(dataset)
    if upload is None:
        enqueue_validation(session, settings, broker, dataset)
        return out
    out.upload = upload
    return out


def upload_target(settings: Settings, storage: Storage, key: str, size: int | None) -> UploadTarget:
    """One signed PUT URL, or, for an archive above the S3 multipart threshold, one per part."""
    mb = 1024 * 1024
    if size is not None and size > settings.s3_multipart_threshold_mb * mb:
        # S3 takes at most 10,000 parts of at least 5 MiB (the last one excepted).
        part_size = max(settings.s3_multipart_chunk_mb * mb, 5 * mb, -(-size // 10_000))
        multipart = storage.signed_multipart(key, size, part_size, settings.url_expiry_s)
        if multipart is not None:
            return UploadTarget(
                url=None, expires_at=multipart.expires_at, max_bytes=settings.dataset_upload_max_bytes,
                upload_id=multipart.upload_id, part_size=multipart.part_size,
                parts=[UploadPart(number=i, url=u) for i, u in enumerate(multipart.urls, start=1)],
            )
    url, expires_at = storage.signed_put_url(key, settings.url_expiry_s)
    return UploadTarget(url=url, expires_at=expires_at, max_bytes=settings.dataset_upload_max_bytes)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    session: ReadSessionDep,
    settings: SettingsDep,
    who: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> Page[DatasetOut]:
    """The tenant's data sets, newest first. Follow ``next_cursor`` until it is null."""
    if limit > settings.page_size_max:
        raise ApiError(422, "invalid_request", f"limit: at most {settings.page_size_max} per page")
    rows, next_cursor = service.list_datasets(session, who, limit, cursor)
    return Page[DatasetOut](items=[DatasetOut.model_validate(d) for d in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: uuid.UUID, session: ReadSessionDep, who: CurrentTenant) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(session, who, dataset_id))


@router.put(
    "/{dataset_id}/archive",
    response_model=DatasetOut,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=ARCHIVE_BODY,
)
async def upload_archive(
    dataset_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    broker: BrokerDep,
    who: CurrentTenant,
) -> DatasetOut:
    """A small archive (at most ``HIPP_DATASET_DIRECT_UPLOAD_MAX_BYTES``) sent as the body
    (``Content-Type: application/octet-stream``); the upload is complete and validation queued."""
    await run_db(session, service.get_dataset, session, who, dataset_id)
    limit = settings.dataset_direct_upload_max_bytes
    with tempfile.TemporaryDirectory(prefix="hipp-upload-") as folder:
        path = Path(folder) / "archive"
        size = await receive_to_file(
            request, path, limit, "the most a direct upload takes; PUT it to the upload URL POST /datasets answers"
        )
        if size == 0:
            raise ApiError(422, "empty_archive", "the body is empty; send the archive's bytes")
        dataset = await run_db(session, service.get_dataset, session, who, dataset_id)
        await anyio.to_thread.run_sync(service.store_direct_upload, storage, dataset, path)
    dataset = await run_db(session, complete_and_enqueue, session, settings, storage, broker, who, dataset_id)
    return DatasetOut.model_validate(dataset)


def complete_and_enqueue(
    session: Session, settings: Settings, storage: Storage, broker: Celery, who: Principal, dataset_id: uuid.UUID,
    body: DatasetComplete | None = None,
) -> Dataset:
    dataset = service.complete_upload(session, storage, who, dataset_id, body)
    enqueue_validation(session, settings, broker, dataset)
    return dataset


@router.post("/{dataset_id}/complete", response_model=DatasetOut, status_code=status.HTTP_202_ACCEPTED)
def complete_upload(
    dataset_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    broker: BrokerDep,
    who: CurrentTenant,
    body: DatasetComplete | None = None,
) -> DatasetOut:
    """The archive is at the upload URL: validate it (the data set becomes ``validating``). After a multipart
    upload, send ``{upload_id, parts: [{number, etag}, ...]}`` to join the parts first."""
    return DatasetOut.model_validate(complete_and_enqueue(session, settings, storage, broker, who, dataset_id, body))


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(dataset_id: uuid.UUID, session: SessionDep, storage: StorageDep, who: CurrentTenant) -> Response:
    """Delete a data set and its stored files. 409 ``dataset_in_use`` while a queued or running job uses it."""
    service.delete_dataset(session, storage, who, dataset_id)
    return Response(status_code=204)
