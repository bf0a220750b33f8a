"""Artifact storage behind one interface, used by the API (signed URLs) and the worker (uploads, stage
outputs).

- ``S3Storage``: boto3 with a multipart transfer config, S3-compatible endpoints (MinIO, moto) through
  path-style addressing and checksum settings "when_required"; the SHA-256 of every object is computed while
  reading the file, stored as object metadata and in the database, and verified after upload (size and
  metadata) and after download (content). Presigned GET URLs are minted per request with an expiry and a
  content-disposition; presigned PUT URLs (``signed_put_url``) let a client upload a data set archive, and
  presigned multipart uploads (``signed_multipart``, ``complete_multipart``) a large one, part by part.
- ``LocalStorage``: a folder, for the embedded default. The API serves it at ``/files/{key}`` through
  HMAC-signed URLs that expire (app/routes/files.py), and takes uploads there through signed PUT URLs.

No torch here: the API image imports this module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from app.config import Settings

CHUNK = 1024 * 1024


class StorageError(Exception):
    """The object store refused or lost something (retryable from the job's point of view)."""


class IntegrityError(StorageError):
    """The bytes read back do not match the recorded SHA-256."""


@dataclass(frozen=True)
class MultipartTarget:
    """A multipart upload started for a client: one presigned PUT URL per part (part ``i`` is bytes
    ``[(i-1)*part_size, i*part_size)`` of the file), then ``complete_multipart`` with each part's ETag."""

    upload_id: str
    part_size: int
    urls: list[str]
    expires_at: datetime


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_disposition(filename: str) -> str:
    safe = filename.replace('"', "").replace("\\", "")
    return f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(filename)}"


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> StoredObject:
        """Upload a file; return its size and SHA-256 (verified against what the store holds)."""
        ...

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject: ...

    def get_bytes(self, key: str) -> bytes: ...

    def download(self, key: str, dest: Path, sha256: str | None = None) -> Path:
        """Download to ``dest``; raise IntegrityError when ``sha256`` is given and does not match."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix`` (a folder such as ``jobs/ID/``); returns how
        many. Deleting what is already gone is not an error."""
        ...

    def signed_url(self, key: str, filename: str, expires_s: int, base_url: str | None = None) -> tuple[str, datetime]:
        """A GET URL valid for ``expires_s`` seconds, minted now; never stored."""
        ...

    def signed_put_url(self, key: str, expires_s: int, base_url: str | None = None) -> tuple[str, datetime]:
        """A URL that takes one ``PUT`` of the object's bytes at ``key`` for ``expires_s`` seconds."""
        ...

    def signed_multipart(self, key: str, size: int, part_size: int, expires_s: int) -> MultipartTarget | None:
        """Start a multipart upload of ``size`` bytes at ``key`` with presigned part URLs; None when the store
        has no multipart uploads (then the single PUT URL takes any size)."""
        ...

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Join the uploaded parts ((number, ETag), in order); raises ``StorageError`` saying what is wrong."""
        ...

    def check(self) -> None:
        """Raise if the store cannot be used (readiness)."""
        ...


class LocalStorage:
    def __init__(self, root: Path, secret: bytes, public_url: str) -> None:
        self.root = root.resolve()
        self.secret = secret
        self.public_url = public_url.rstrip("/")

    def path(self, key: str) -> Path:
        p = (self.root / check_key(key)).resolve()
        if self.root not in p.parents:
            raise ValueError(f"invalid storage key {key!r}")
        return p

    def _write(self, key: str, write: Any) -> StoredObject:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key=key, size=dest.stat().st_size, sha256=sha256_file(dest))

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> StoredObject:
        expected = sha256_file(path)

        def write(f: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)

        obj = self._write(key, write)
        if obj.sha256 != expected:
            raise IntegrityError(f"stored {key} has sha256 {obj.sha256}, expected {expected}")
        return obj

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        return self._write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"object {key} is missing") from exc

    def download(self, key: str, dest: Path, sha256: str | None = None) -> Path:
        src = self.path(key)
        if not src.exists():
            raise StorageError(f"object {key} is missing")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        if sha256 is not None and sha256_file(dest) != sha256:
            raise IntegrityError(f"downloaded {key} does not match sha256 {sha256}")
        return dest

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        folder = self.path(prefix.rstrip("/"))
        if not folder.is_dir():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def signed_url(self, key: str, filename: str, expires_s: int, base_url: str | None = None) -> tuple[str, datetime]:
        from app.security import sign

        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "filename": filename, "sig": sign(self.secret, key, expires, filename)})
        base = (base_url or self.public_url).rstrip("/")
        return f"{base}/files/{quote(check_key(key))}?{query}", datetime.fromtimestamp(expires, UTC)

    def signed_put_url(self, key: str, expires_s: int, base_url: str | None = None) -> tuple[str, datetime]:
        from app.security import sign_upload

        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "sig": sign_upload(self.secret, key, expires)})
        base = (base_url or self.public_url).rstrip("/")
        return f"{base}/files/{quote(check_key(key))}?{query}", datetime.fromtimestamp(expires, UTC)

    def signed_multipart(self, key: str, size: int, part_size: int, expires_s: int) -> MultipartTarget | None:
        return None  # a local PUT streams to disk whatever its size

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        raise StorageError("the local store takes one PUT per object, not multipart uploads")

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".ready"
        probe.write_text(str(time.time()))


class S3Storage:
    def __init__(self, settings: Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": settings.s3_addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=config,
        )
        mb = 1024 * 1024
        self.transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_mb * mb,
            multipart_chunksize=settings.s3_multipart_chunk_mb * mb,
            max_concurrency=settings.s3_max_concurrency,
            use_threads=settings.s3_max_concurrency > 1,
        )
        if settings.s3_create_bucket:
            self.ensure_bucket()

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _verify(self, key: str, size: int, sha256: str) -> None:
        head = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
            raise IntegrityError(
                f"s3://{self.bucket}/{self._k(key)} holds {head['ContentLength']} bytes "
                f"(sha256 {head.get('Metadata', {}).get('sha256')}), expected {size} bytes (sha256 {sha256})"
            )

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> StoredObject:
        digest = sha256_file(path)
        size = path.stat().st_size
        self.client.upload_file(
            str(path),
            self.bucket,
            self._k(key),
            ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": digest}},
            Config=self.transfer,
        )
        self._verify(key, size, digest)
        return StoredObject(key=key, size=size, sha256=digest)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        digest = hashlib.sha256(data).hexdigest()
        self.client.put_object(
            Bucket=self.bucket,
            Key=self._k(key),
            Body=data,
            ContentType=content_type,
            Metadata={"sha256": digest},
        )
        return StoredObject(key=key, size=len(data), sha256=digest)

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            return bytes(body.read())
        except ClientError as exc:
            raise StorageError(f"cannot read s3://{self.bucket}/{self._k(key)}: {exc}") from exc

    def download(self, key: str, dest: Path, sha256: str | None = None) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._k(key), str(dest), Config=self.transfer)
        if sha256 is not None and sha256_file(dest) != sha256:
            raise IntegrityError(f"downloaded {key} does not match sha256 {sha256}")
        return dest

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError:
            return False

    def delete_prefix(self, prefix: str) -> int:
        check_key(prefix.rstrip("/"))
        full = self._k(prefix.rstrip("/")) + "/"
        count = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
        return count

    def signed_url(self, key: str, filename: str, expires_s: int, base_url: str | None = None) -> tuple[str, datetime]:
        url = self.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._k(key),
                "ResponseContentDisposition": content_disposition(filename),
            },
            ExpiresIn=expires_s,
        )
        return url, datetime.fromtimestamp(int(time.time()) + expires_s, UTC)

    def signed_put_url(self, key: str, expires_s: int, base_url: str | None = None) -> tuple[str, datetime]:
        url = self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=expires_s
        )
        return url, datetime.fromtimestamp(int(time.time()) + expires_s, UTC)

    def signed_multipart(self, key: str, size: int, part_size: int, expires_s: int) -> MultipartTarget | None:
        count = max(1, -(-size // part_size))
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._k(key))["UploadId"]
        urls = [
            self.client.generate_presigned_url(
                "upload_part",
                Params={"Bucket": self.bucket, "Key": self._k(key), "UploadId": upload_id, "PartNumber": number},
                ExpiresIn=expires_s,
            )
            for number in range(1, count + 1)
        ]
        return MultipartTarget(upload_id, part_size, urls, datetime.fromtimestamp(int(time.time()) + expires_s, UTC))

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self._k(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]},
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise StorageError(f"{error.get('Code', 'error')}: {error.get('Message', str(exc))}") from None

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def open_storage(settings: Settings) -> Storage:
    """The store ``settings`` describe, as a new object (boto3 clients are thread-safe: build one per process
    and share it, as the API's runtime does)."""
    if settings.storage == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.resolved_storage_dir, settings.resolved_signing_secret, settings.public_url)


def get_storage(settings: Settings) -> Storage:
    """``open_storage``, under the name callers without a runtime (the worker pipeline, tests) use."""
    return open_storage(settings)
