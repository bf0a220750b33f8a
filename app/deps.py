"""Dependencies, declared once as ``Annotated`` types and reused in every route signature."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import read_session_factory, session_factory
from app.errors import ApiError
from app.security import Principal, cached_principal, verify_api_key
from app.storage import Storage, get_storage


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session per request. Creating one does no I/O (it connects on first use), so this dependency runs
    on the event loop; closing one that used a connection is moved off the loop."""
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_read_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """An autocommit session for routes that only read (one round trip per query, nothing to roll back)."""
    session = read_session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


ReadSessionDep = Annotated[Session, Depends(get_read_session)]


async def get_storage_dep(settings: SettingsDep) -> Storage:
    return get_storage(settings)


StorageDep = Annotated[Storage, Depends(get_storage_dep)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Alternative to the bearer header")

HOW_TO_GET_A_KEY = "create one with `hipp api-key create --tenant NAME`"


def _verify(settings: Settings, key: str) -> Principal | None:
    with read_session_factory(settings.resolved_database_url)() as session:
        return verify_api_key(session, key, settings.api_key_cache_s)


async def get_principal(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> Principal:
    """The caller's tenant. A recently verified key is answered from the in-process cache, on the loop;
    otherwise the database check runs in the thread pool."""
    key = (bearer.credentials if bearer is not None else header_key or "").strip()
    challenge = {"WWW-Authenticate": "Bearer"}
    if not key:
        raise ApiError(
            401,
            "missing_api_key",
            f"missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'; {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    principal = cached_principal(key) or await run_in_threadpool(_verify, settings, key)
    if principal is None:
        raise ApiError(
            401,
            "invalid_api_key",
            f"invalid or revoked API key; check HIPP_API_KEY or {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    return principal


CurrentTenant = Annotated[Principal, Depends(get_principal)]
