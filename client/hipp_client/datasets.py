"""Datasets through the API: create, upload (signed URL, S3 multipart parts, or in the request body), wait for
validation, list, show, delete. ``HippClient`` inherits :class:`DatasetsMixin`; answers are :class:`Dataset`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from hipp_client.errors import BAD_RESPONSE, UPLOAD_FAILED, WAIT_TIMEOUT, HippApiError
from hipp_client.types import Dataset, Page

KINDS = ("images", "pope", "scienceqa", "conversations")
SETTLED = ("ready", "invalid")


def _path(dataset_id: str) -> str:
    return f"/datasets/{quote(str(dataset_id), safe='')}"


def _dataset(data: Any) -> Dataset:
    try:
        return Dataset.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise HippApiError(None, BAD_RESPONSE, f"unexpected answer from the API ({exc!r}): {str(data)[:300]}") from exc


def put_signed(url: str, content: Any, size: int) -> httpx.Response:
    """PUT to a signed URL with an explicit length (presigned S3 PUTs refuse chunked bodies)."""
    r = httpx.put(url, content=content, headers={"Content-Length": str(size)}, timeout=None)
    if r.status_code >= 300:
        raise HippApiError(r.status_code, UPLOAD_FAILED, f"upload to the signed URL failed: {r.text[:300]}")
    return r


class DatasetsMixin:
    """The datasets resource; mixed into ``HippClient`` (which provides ``request``)."""

    request: Callable[..., Any]

    def create_dataset(self, kind: str, name: str, *, s3_uri: str | None = None, size: int | None = None) -> Dataset:
        """A dataset in state ``uploading`` with its upload target (``raw["upload"]``), or, with ``s3_uri`` (an
        archive already in the deployment's bucket), one that is validated from there. ``size``: the archive's
        bytes, so a large one gets multipart part URLs."""
        body: dict[str, Any] = {"kind": kind, "name": name,
                                "source": {"s3_uri": s3_uri} if s3_uri else {"upload": True}}
        if size is not None:
            body["size"] = size
        return _dataset(self.request("POST", "/datasets", json=body))

    def upload_dataset(self, dataset: Dataset, archive: str | Path, *, direct: bool = False,
                       on_part: Callable[[int, int], None] | None = None) -> Dataset:
        """Send ``archive`` for a dataset in state ``uploading`` (to its signed URL, in parts when it has part
        URLs, or in the request body with ``direct``); returns it with validation queued."""
        archive = Path(archive)
        size = archive.stat().st_size
        if direct:
            return _dataset(self.request("PUT", f"{_path(dataset.id)}/archive", content=archive.read_bytes(),
                                         headers={"Content-Type": "application/octet-stream"}))
        target = dataset.raw.get("upload") or {}
        if not target:
            raise HippApiError(None, UPLOAD_FAILED, f"dataset {dataset.id} takes no upload (state {dataset.state})")
        if size > target["max_bytes"]:
            raise HippApiError(None, UPLOAD_FAILED,
                               f"{archive} holds {size} bytes, more than the {target['max_bytes']} this upload takes")
        if target.get("parts"):
            parts = self._put_parts(target, archive, on_part)
            body = {"upload_id": target["upload_id"], "parts": parts}
            return _dataset(self.request("POST", f"{_path(dataset.id)}/complete", json=body))
        with archive.open("rb") as f:
            put_signed(target["url"], f, size)
        return _dataset(self.request("POST", f"{_path(dataset.id)}/complete"))

    @staticmethod
    def _put_parts(target: dict[str, Any], archive: Path,
                   on_part: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
        done = []
        with archive.open("rb") as f:
            for part in target["parts"]:
                chunk = f.read(target["part_size"])
                etag = put_signed(part["url"], chunk, len(chunk)).headers.get("ETag")
                if not etag:
                    raise HippApiError(None, UPLOAD_FAILED, f"the store answered part {part['number']} without an ETag")
                done.append({"number": part["number"], "etag": etag})
                if on_part is not None:
                    on_part(part["number"], len(target["parts"]))
        return done

    def get_dataset(self, dataset_id: str) -> Dataset:
        return _dataset(self.request("GET", _path(dataset_id)))

    def datasets_page(self, *, limit: int = 50, cursor: str | None = None) -> Page[Dataset]:
        """One page of the tenant's datasets, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        data = self.request("GET", "/datasets", params=params)
        return Page(items=[_dataset(d) for d in data["items"]], next_cursor=data.get("next_cursor"), raw=data)

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset and its stored archive (409 ``dataset_in_use`` while a queued or running job uses it)."""
        self.request("DELETE", _path(dataset_id))

    def wait_dataset(self, dataset_id: str, *, timeout: float = 600.0, interval: float = 1.0) -> Dataset:
        """Poll until validation settles (``ready`` or ``invalid``); ``wait_timeout`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            dataset = self.get_dataset(dataset_id)
            if dataset.state in SETTLED:
                return dataset
            if time.monotonic() >= deadline:
                raise HippApiError(None, WAIT_TIMEOUT, f"dataset {dataset_id} still {dataset.state} after {timeout:g}s")
            time.sleep(interval)
