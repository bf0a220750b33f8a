"""Dependencies, declared once as ``Annotated`` types and reused in every route signature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_factory
from app.errors import ApiError
from app.security import Principal, verify_api_key
from app.storage import Storage, get_storage


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_factory(settings.resolved_database_url)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_storage_dep(settings: SettingsDep) -> Storage:
    return get_storage(settings)


StorageDep = Annotated[Storage, Depends(get_storage_dep)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Alternative to the bearer header")

HOW_TO_GET_A_KEY = "create one with `hipp api-key create --tenant NAME`"


def get_principal(
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> Principal:
    key = bearer.credentials if bearer is not None else header_key
    challenge = {"WWW-Authenticate": "Bearer"}
    if not key:
        raise ApiError(
            401,
            "missing_api_key",
            f"missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'; {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    principal = verify_api_key(session, key.strip(), settings.api_key_cache_s)
    if principal is None:
        raise ApiError(
            401,
            "invalid_api_key",
            f"invalid or revoked API key (it starts {key[:10]!r}); check HIPP_API_KEY or {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    return principal


CurrentTenant = Annotated[Principal, Depends(get_principal)]
