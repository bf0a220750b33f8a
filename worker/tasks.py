"""Celery tasks. Thin: they hand over to worker/pipeline.py (which imports torch lazily, inside the task)."""

from __future__ import annotations

import logging

from app.config import get_settings
from app.queue import REAP, RELAY, RUN_JOB
from worker.celery_app import celery_app

log = logging.getLogger("hipp.tasks")


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from worker.pipeline import run_job as run

    outcome = run(job_id, get_settings())
    log.info("job %s: %s", job_id, outcome)
    return outcome


@celery_app.task(name=RELAY, ignore_result=True)
def relay_pending() -> int:
    """Publish jobs that were committed but never enqueued (the outbox relay)."""
    from app.db import session_factory
    from app.queue import relay_pending as relay

    settings = get_settings()
    return relay(settings, session_factory(settings.resolved_database_url))


@celery_app.task(name=REAP, ignore_result=True)
def reap_stale() -> dict[str, int]:
    """Re-queue (or fail, after the attempt cap) jobs whose worker stopped heartbeating."""
    from app.db import session_factory
    from app.reaper import reap_stale as reap

    settings = get_settings()
    return reap(settings, session_factory(settings.resolved_database_url)).as_dict()
