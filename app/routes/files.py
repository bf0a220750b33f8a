"""Downloads from the local store (embedded deployment) through HMAC-signed URLs that expire, and uploads to
it through signed PUT URLs (data set archives: ``POST /datasets`` mints them).

The signature is the credential: no API key is needed, so the URL can be handed to curl or a browser. The
URLs are built on ``HIPP_PUBLIC_URL`` (never on the request's ``Host`` header, which the caller controls).
``HEAD`` answers the size and headers without the body.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from app.deps import SettingsDep, StorageDep
from app.errors import ApiError
from app.security import check_signature, check_upload_signature
from app.storage import LocalStorage, content_disposition

router = APIRouter(tags=["files"])


def download(
    key: str, expires: int, filename: str, sig: str, settings: SettingsDep, storage: StorageDep
) -> FileResponse:
    if not isinstance(storage, LocalStorage):
        raise ApiError(404, "not_found", "this deployment serves artifacts from object storage, not /files")
    if expires < time.time():
        raise ApiError(403, "url_expired", "this download URL has expired; list the job's artifacts for a fresh one")
    if not check_signature(storage.secret, key, expires, filename, sig):
        raise ApiError(403, "bad_signature", "this download URL is not valid (altered or from another server)")
    try:
        path = storage.path(key)
    except ValueError as exc:
        raise ApiError(400, "invalid_key", str(exc)) from exc
    if not path.is_file():
        raise ApiError(404, "not_found", "the artifact is no longer stored")
    return FileResponse(path, headers={"Content-Disposition": content_disposition(filename)})


for _method in ("GET", "HEAD"):
    router.add_api_route(
        "/files/{key:path}",
        download,
        methods=[_method],
        operation_id=f"{_method.lower()}_file",
        summary="Download an artifact through its signed URL" if _method == "GET" else "Size and headers only",
        response_class=FileResponse,
        responses={200: {"description": "The file", "content": {"application/octet-stream": {}}}},
    )


async def receive_to_file(request: Request, path: Path, limit: int, hint: str) -> int:
    """Stream the request body into ``path``; 413 past ``limit`` bytes (``hint``: what to do instead)."""
    size = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"the file is larger than {limit} bytes, {hint}")
            await anyio.to_thread.run_sync(f.write, chunk)
    return size


async def upload(
    key: str, expires: int, sig: str, request: Request, settings: SettingsDep, storage: StorageDep
) -> Response:
    """Take the body as the object at ``key``: the URL's signature (minted by ``POST /datasets``) is the
    credential, as for downloads."""
    if not isinstance(storage, LocalStorage):
        raise ApiError(404, "not_found", "this deployment takes uploads through object storage URLs, not /files")
    if expires < time.time():
        raise ApiError(403, "url_expired", "this upload URL has expired; create the data set again for a fresh one")
    if not check_upload_signature(storage.secret, key, expires, sig):
        raise ApiError(403, "bad_signature", "this upload URL is not valid (altered or from another server)")
    try:
        storage.path(key)
    except ValueError as exc:
        raise ApiError(400, "invalid_key", str(exc)) from exc
    with tempfile.TemporaryDirectory(prefix="hipp-upload-") as folder:
        path = Path(folder) / "upload"
        await receive_to_file(request, path, settings.dataset_upload_max_bytes, "the most an upload takes")
        await anyio.to_thread.run_sync(storage.put_file, key, path)
    return Response(status_code=200)


router.add_api_route(
    "/files/{key:path}",
    upload,
    methods=["PUT"],
    operation_id="put_file",
    summary="Upload a file through its signed PUT URL",
    response_class=Response,
    responses={200: {"description": "Stored"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
