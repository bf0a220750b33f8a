"""Downloads from the local store (embedded deployment) through HMAC-signed URLs that expire.

The signature is the credential: no API key is needed, so the URL can be handed to curl or a browser. The
URLs are built on ``HIPP_PUBLIC_URL`` (never on the request's ``Host`` header, which the caller controls).
``HEAD`` answers the size and headers without the body.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import SettingsDep, StorageDep
from app.errors import ApiError
from app.security import check_signature
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
