"""The FastAPI application: ``uvicorn app.main:app`` (settings from the environment) or
``create_app(settings)``.

The app's lifespan builds its one runtime (app/runtime.py: database, broker client and dispatcher, storage,
key cache, rate limits) on ``app.state.runtime``, and the long-poll watcher on ``app.state.watcher``; it
closes both at shutdown. Routes reach them through app/deps.py.

OpenAPI docs at ``/docs``; errors in one JSON shape (app/errors.py); request metrics and the body size
limit in one pure-ASGI middleware (app/metrics.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from app import errors, openapi
from app.config import Settings, get_settings
from app.metrics import MetricsAndLimits
from app.routes import datasets, files, health, jobs, policies, usage
from app.runtime import Runtime
from app.watch import JobWatcher, drain_on_signals

DESCRIPTION = """
Preference-conditioned structured pruning of vision-language models, as jobs.

`POST /jobs` with a model and a preference vector over *utility*, *robustness* and *compression*; poll
`GET /jobs/{id}` (status, stage, progress); list `GET /jobs/{id}/artifacts` for signed download URLs of the
pruned checkpoint (a Hugging Face directory packed as a tar archive, with its SHA-256).

Authenticate with `Authorization: Bearer <API key>` (create one with `hipp api-key create --tenant NAME`).
Every error is `{"error": {"code", "message", "detail"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Threads that run route code, and one pooled connection for each (app/deps.py, app/db.py).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        runtime = app.state.runtime = Runtime.for_api(settings)
        watcher = app.state.watcher = JobWatcher(runtime.db.read_sessions)
        undo = drain_on_signals(watcher)
        try:
            yield
        finally:
            undo()
            await watcher.close()
            # Off the loop: the dispatcher may still be publishing its last batch.
            await anyio.to_thread.run_sync(runtime.close)
            del app.state.runtime, app.state.watcher

    app = FastAPI(
        title="HiPP-Prune",
        version="0.1.0",
        description=DESCRIPTION,
        default_response_class=errors.SafeJSONResponse,
        lifespan=lifespan,
    )
    app.state.settings = settings  # read-only configuration; the runtime built from it lives in the lifespan
    errors.install(app)
    for module in (jobs, datasets, policies, health, files, usage):
        app.include_router(module.router)
    openapi.install(app)
    uploads = [
        (re.compile(r"/datasets/[^/]+/archive"), settings.dataset_direct_upload_max_bytes),
        (re.compile(r"/files/.+"), settings.dataset_upload_max_bytes),
    ]
    app.add_middleware(MetricsAndLimits, max_body=settings.max_body_bytes, uploads=uploads)
    logging.getLogger("hipp").setLevel(logging.INFO)
    return app


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn app.main:app`` builds the app lazily, so importing this module has no side effects.
    if name == "app":
        return create_app()
    raise AttributeError(name)
