"""Dependencies, declared once as ``Annotated`` types and reused in every route signature.

Database discipline (what keeps a few hundred pollers from starving the pool):

- One ``Session`` per request (``SessionDep``; ``ReadSessionDep`` is the same dependency). It is an autocommit
  session for GET/HEAD (one round trip per query, nothing to roll back) and a transactional one otherwise.
  The API-key check (``CurrentTenant``) uses that same session.
- A session connects on its first query, which always runs in a worker thread, and that thread gives the
  connection back before it finishes: the key check closes the session after its lookup, and every sync
  route served through ``DbRoute`` closes its sessions when it returns, in its own thread. So no connection is
  held while a request awaits anything (a thread, the response serializer, a slow client), each thread holds
  at most one, and the pool, sized from the thread count (app/db.py), never runs dry under load.
- Async routes run their database work with ``run_db``, which does the same.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import read_session_factory, session_factory
from app.errors import ApiError
from app.security import Principal, cached_principal, verify_api_key
from app.storage import Storage, get_storage

T = TypeVar("T")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(request: Request, settings: SettingsDep) -> AsyncIterator[Session]:
    """The request's one session (see the module docstring). Creating it does no I/O."""
    url = settings.resolved_database_url
    factory = read_session_factory(url) if request.method in READ_METHODS else session_factory(url)
    session = factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            # Only when a route kept its connection (an error path): close it off the event loop, on a
            # limiter of its own, so giving a connection back never waits for a busy thread pool.
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = SessionDep  # the same session: GET routes get the autocommit flavour


def close_after(session: Session, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` and give the session's connection back, in the calling thread."""
    try:
        return fn(*args)
    finally:
        session.close()


async def run_db(session: Session, fn: Callable[..., T], *args: Any) -> T:
    """For async routes: ``fn(*args)`` in a worker thread, the session closed (connection returned) before
    the thread finishes."""
    return await run_in_threadpool(close_after, session, fn, *args)


def _session_params(endpoint: Callable[..., Any]) -> tuple[inspect.Signature, list[str]]:
    sig = inspect.signature(endpoint, eval_str=True)
    names = []
    for p in sig.parameters.values():
        ann = p.annotation
        base = typing.get_args(ann)[0] if typing.get_origin(ann) is Annotated else ann
        if inspect.isclass(base) and issubclass(base, Session):
            names.append(p.name)
    return sig, names


class DbRoute(APIRoute):
    """Routes whose sync endpoint takes a session close it in the endpoint's own thread when it returns
    (objects it loaded stay readable for the response). Set as ``APIRouter(route_class=DbRoute)``."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            sig, names = _session_params(endpoint)
            if names:
                inner = endpoint

                @functools.wraps(inner)
                def endpoint(*args: Any, **kw: Any) -> Any:
                    try:
                        return inner(*args, **kw)
                    finally:
                        for name in names:
                            if kw.get(name) is not None:
                                kw[name].close()

                endpoint.__signature__ = sig  # type: ignore[attr-defined]
        super().__init__(path, endpoint, **kwargs)


async def get_storage_dep(settings: SettingsDep) -> Storage:
    return get_storage(settings)


StorageDep = Annotated[Storage, Depends(get_storage_dep)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Alternative to the bearer header")

HOW_TO_GET_A_KEY = "create one with `hipp api-key create --tenant NAME`"


async def get_principal(
    settings: SettingsDep,
    session: SessionDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> Principal:
    """The caller's tenant. A recently verified key is answered from the in-process cache, on the loop;
    otherwise the database check runs in the thread pool, on the route's session, and gives its connection
    back before the route runs."""
    key = (bearer.credentials if bearer is not None else header_key or "").strip()
    challenge = {"WWW-Authenticate": "Bearer"}
    if not key:
        raise ApiError(
            401,
            "missing_api_key",
            f"missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'; {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    principal = cached_principal(key) or await run_db(session, verify_api_key, session, key, settings.api_key_cache_s)
    if principal is None:
        raise ApiError(
            401,
            "invalid_api_key",
            f"invalid or revoked API key; check HIPP_API_KEY or {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    return principal


CurrentTenant = Annotated[Principal, Depends(get_principal)]
