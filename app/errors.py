"""One JSON error shape for every response the API sends that is not a success::

    {"error": {"code": "invalid_preference", "message": "what went wrong and how to fix it", "detail": ...}}

``ApiError`` is raised by routes and services; request validation, HTTP errors from Starlette and
unexpected exceptions are mapped to the same shape here. A database that cannot be reached is a 503
``database_unavailable`` with ``Retry-After`` (never a 500).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import BotoCoreError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import MAX_DEPTH

log = logging.getLogger("hipp.api")


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: text that is not valid Unicode (a lone surrogate stored before the API
    rejected them) is escaped instead of failing the response half-way (a 500 and a reset connection)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail}}


def not_found(what: str, ident: object) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident} does not exist (or belongs to another tenant)")


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _validation_message(errors: list[dict[str, Any]]) -> str:
    msgs = []
    for e in errors[:5]:
        msg = str(e.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        msgs.append(f"{_loc(e.get('loc', ()))}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(msgs) + more


def database_unavailable(exc: Exception) -> JSONResponse:
    """503 while the database is unreachable (restart, failover); pooled connections are replaced on the
    next request, so the API recovers by itself once the database is back."""
    log.warning("database unavailable: %s", str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    return SafeJSONResponse(
        error_body("database_unavailable", "the database is unavailable right now; retry in a few seconds"),
        503,
        headers={"Retry-After": "5"},
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return SafeJSONResponse(error_body(exc.code, exc.message, exc.detail), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")} for e in exc.errors()
        ]
        return SafeJSONResponse(error_body("invalid_request", _validation_message(errors), errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see /docs for the API reference"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer when the JSON parser gives up (e.g. nesting deeper than it can recurse).
            code = "invalid_body"
            message = f"the request body could not be parsed as JSON (nested too deeply?); send a JSON object " \
                f"nested at most {MAX_DEPTH} levels"
        return SafeJSONResponse(error_body(code, message), exc.status_code, headers=exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            return database_unavailable(exc)
        log.exception("database error", exc_info=exc)
        return SafeJSONResponse(error_body("internal_error", "internal server error; retry later"), 500)

    @app.exception_handler(PoolTimeout)
    async def _pool(_: Request, exc: PoolTimeout) -> JSONResponse:
        # Every pooled connection stayed busy for HIPP_DB_POOL_TIMEOUT_S (a slow or stalled database): answer
        # at once and let the client come back, rather than queueing requests behind it.
        log.warning("database pool exhausted: %s", str(exc).splitlines()[0][:200])
        return SafeJSONResponse(
            error_body("server_busy", "the server is busy (no database connection free); retry in a second"),
            503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(BotoCoreError)
    async def _storage(_: Request, exc: BotoCoreError) -> JSONResponse:
        # The object store did not answer (connection refused, timeout): the caller's request was fine.
        log.warning("object storage unavailable: %s", str(exc)[:200])
        return SafeJSONResponse(
            error_body("storage_unavailable", "the object store is not reachable right now; retry in a few seconds"),
            503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return SafeJSONResponse(error_body("internal_error", "internal server error; retry later"), 500)
