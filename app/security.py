"""API keys and signed URLs.

A key reads ``hipp_<prefix>_<secret>``: the prefix finds the row, the SHA-256 of the whole key is compared in
constant time. Keys carry 256 bits of randomness, so a fast hash is the right tool (nothing to brute-force).
Verified keys are cached in-process for ``HIPP_API_KEY_CACHE_S`` seconds (a ``KeyCache``, one per API runtime,
app/runtime.py), so polling does not cost a query; a revoked key stops working within that window.

Local artifacts are served through HMAC-SHA256 signed URLs that carry their expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_key(key: str) -> str | None:
    """Return the lookup prefix of a well-formed key, else None."""
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != "hipp" or not parts[1] or not parts[2]:
        return None
    return parts[1]


def create_api_key(session: Session, tenant_name: str, name: str = "") -> tuple[str, Tenant]:
    """Create (or reuse) the tenant and a new key for it. Returns the plaintext key, shown once."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    key = f"hipp_{prefix}_{secrets.token_urlsafe(32).replace('_', 'x')}"
    session.add(ApiKey(tenant_id=tenant.id, name=name, prefix=prefix, key_hash=hash_key(key)))
    session.flush()
    return key, tenant


@dataclass(frozen=True)
class Principal:
    tenant_id: uuid.UUID
    tenant_name: str
    key_id: uuid.UUID


class KeyCache:
    """Verified keys by hash, each until its expiry (monotonic clock). Bounded: cleared past 10,000 keys."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, Principal]] = {}

    def get(self, key_hash: str) -> Principal | None:
        item = self._items.get(key_hash)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    def put(self, key_hash: str, principal: Principal, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[key_hash] = (time.monotonic() + ttl, principal)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def cached_principal(cache: KeyCache, key: str) -> Principal | None:
    return cache.get(hash_key(key))


def verify_api_key(session: Session, key: str, cache: KeyCache, cache_ttl: float) -> Principal | None:
    """The key's principal (from ``cache``, else from the database, then cached for ``cache_ttl`` s), or None
    for a malformed, unknown or revoked key."""
    key_hash = hash_key(key)
    cached = cache.get(key_hash)
    if cached is not None:
        return cached
    prefix = split_key(key)
    if prefix is None:
        return None
    row = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(row[0].key_hash, key_hash):
        return None
    principal = Principal(tenant_id=row[0].tenant_id, tenant_name=row[1], key_id=row[0].id)
    cache.put(key_hash, principal, cache_ttl)
    return principal


# Signed URLs for the local store --------------------------------------------------------------------------
def sign(secret: bytes, key: str, expires: int, filename: str) -> str:
    msg = f"{key}\n{expires}\n{filename}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign_upload(secret: bytes, key: str, expires: int) -> str:
    """The signature of a PUT URL (local store): a message no download signature can have (its second line
    is the key, never an expiry), so a download URL cannot be turned into an upload one."""
    msg = f"PUT\n{key}\n{expires}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def check_upload_signature(secret: bytes, key: str, expires: int, signature: str) -> bool:
    sent = signature.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(sign_upload(secret, key, expires).encode(), sent)


def check_signature(secret: bytes, key: str, expires: int, filename: str, signature: str) -> bool:
    # Bytes, so that any text a caller sends (non-ASCII, lone surrogates) is a mismatch, not an error.
    sent = signature.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(sign(secret, key, expires, filename).encode(), sent)
