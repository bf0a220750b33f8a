"""Dependencies, declared once as ``Annotated`` types and reused in every route signature.

Everything shared between requests comes from the app's one runtime (``RuntimeDep``, app/runtime.py, built in
the lifespan of ``app.main.create_app``): settings, sessions, storage, the dispatcher, the broker client, the
API-key cache, the rate-limit buckets and the per-tenant submission locks.

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
import math
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
from celery import Celery
from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ApiError
from app.queue import Dispatcher
from app.runtime import Runtime
from app.security import Principal, cached_principal, verify_api_key
from app.services.jobs import TenantLocks
from app.storage import Storage
from app.watch import JobWatcher

T = TypeVar("T")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:  # a programming error, not a client's: the app was served without its lifespan
        raise RuntimeError("the app has no runtime: serve it with its lifespan (ASGI lifespan, `with TestClient`)")
    return runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_app_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(request: Request, runtime: RuntimeDep) -> AsyncIterator[Session]:
    """The request's one session (see the module docstring). Creating it does no I/O."""
    factory = runtime.db.read_sessions if request.method in READ_METHODS else runtime.db.sessions
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


async def get_storage(runtime: RuntimeDep) -> Storage:
    return runtime.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_dispatcher(runtime: RuntimeDep) -> Dispatcher:
    return runtime.dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


async def get_broker(runtime: RuntimeDep) -> Celery:
    return runtime.broker


BrokerDep = Annotated[Celery, Depends(get_broker)]


async def get_watcher(request: Request) -> JobWatcher:
    return request.app.state.watcher  # type: ignore[no-any-return]


WatcherDep = Annotated[JobWatcher, Depends(get_watcher)]


async def get_tenant_locks(runtime: RuntimeDep) -> TenantLocks:
    return runtime.tenant_locks


TenantLocksDep = Annotated[TenantLocks, Depends(get_tenant_locks)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Alternative to the bearer header")

HOW_TO_GET_A_KEY = "create one with `hipp api-key create --tenant NAME`"


async def get_principal(
    runtime: RuntimeDep,
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
    principal = cached_principal(runtime.keys, key) or await run_db(
        session, verify_api_key, session, key, runtime.keys, runtime.settings.api_key_cache_s
    )
    if principal is None:
        raise ApiError(
            401,
            "invalid_api_key",
            f"invalid or revoked API key; check HIPP_API_KEY or {HOW_TO_GET_A_KEY}",
            headers=challenge,
        )
    return principal


CurrentTenant = Annotated[Principal, Depends(get_principal)]


def rate_limit(action: str) -> Callable[..., Awaitable[None]]:
    """A dependency that takes one of the tenant's ``action`` tokens (app/ratelimit.py), else answers 429
    ``rate_limited`` with ``Retry-After``."""

    async def check(who: CurrentTenant, runtime: RuntimeDep) -> None:
        settings = runtime.settings
        if settings.rate_limit_per_minute <= 0:
            return
        wait = runtime.limits.take(action, who.tenant_id, settings.rate_limit_per_minute, settings.rate_limit_burst)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "rate_limited",
                f"too many {action} requests for this tenant (limit {settings.rate_limit_per_minute:g} per minute, "
                f"bursts of {settings.rate_limit_burst}); retry in {retry} s",
                detail={"retry_after_s": retry, "action": action},
                headers={"Retry-After": str(retry)},
            )

    return check

