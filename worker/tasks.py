"""Celery tasks. Thin: they hand over to the job pipeline (``worker.pipeline``), data set validation
(``worker.datasets``), plan evaluation (``worker.evaluation_queue``) and the app's relay, reaper and retention
sweep."""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.request import Request

from app.config import get_settings
from app.db import session_factory
from app.queue import EVALUATE_PLANS, REAP, RELAY, RUN_JOB, SWEEP, VALIDATE_DATASET, still_queued
from app.queue import relay_pending as relay
from app.reaper import reap_stale as reap
from app.retention import sweep
from app.storage import get_storage
from worker.celery_app import celery_app
from worker.pipeline import run_job as run_pipeline

log = logging.getLogger("hipp.tasks")


class JobRequest(Request):
    """A delivered ``hipp.run_job`` message, in the worker's main process. A job that can no longer be
    claimed (cancelled while queued, finished, a duplicate delivery) is acknowledged and dropped here,
    before it reaches the pool: with one task per child, running it would cost a fresh child process
    (seconds) per cancelled job, and a tenant's cancel storm would delay everyone else's jobs."""

    def revoked(self) -> bool:
        # Celery asks this right before sending the message to the pool (and drops a revoked one: acked,
        # its pool slot released); the per-task Request subclass Celery builds keeps this method.
        if super().revoked():
            return True
        job_id = str(self.args[0]) if self.args else ""
        if job_id and not still_queued(get_settings(), job_id):
            log.info("job %s: nothing to claim (cancelled, finished or running elsewhere); dropped", job_id)
            self._announce_revoked("nothing to claim", False, None, False)
            return True
        return False


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True, Request=JobRequest)
def run_job(job_id: str) -> str:
    settings = get_settings()
    outcome = run_pipeline(job_id, settings)  # torch is imported there, in the pool's child, when a stage runs
    log.info("job %s: %s", job_id, outcome)
    if settings.max_waiting_per_tenant > 0:
        # Fair order: a tenant's held-back jobs are published as its earlier ones leave the broker.
        try:
            relay(settings, session_factory(settings.resolved_database_url), min_age_s=0)
        except Exception as exc:  # beat's relay publishes them later
            log.warning("relay after job %s failed: %s", job_id, exc)
    return outcome


@celery_app.task(name=RELAY, ignore_result=True)
def relay_pending() -> int:
    """Publish jobs that were committed but never enqueued (the outbox relay)."""
    settings = get_settings()
    return relay(settings, session_factory(settings.resolved_database_url))


@celery_app.task(name=REAP, ignore_result=True)
def reap_stale() -> dict[str, int]:
    """Re-queue (or fail, after the attempt cap) jobs whose worker stopped heartbeating."""
    settings = get_settings()
    return reap(settings, session_factory(settings.resolved_database_url)).as_dict()


@celery_app.task(name=SWEEP, ignore_result=True)
def retention_sweep() -> dict[str, int]:
    """Delete stage outputs of finished jobs and artifacts past their retention (app/retention.py)."""
    settings = get_settings()
    return sweep(settings, session_factory(settings.resolved_database_url), get_storage(settings)).as_dict()


@celery_app.task(name=VALIDATE_DATASET, acks_late=True, ignore_result=True)
def validate_dataset(dataset_id: str) -> str:
    """Unpack and check an uploaded data set (worker/datasets.py): ready with counts, or invalid with reasons."""
    # Imported here: the API image ships this module (beat, the relay) without the validation code.
    from worker.datasets import validate_dataset as validate

    settings = get_settings()
    storage = get_storage(settings)
    return validate(dataset_id, settings, session_factory(settings.resolved_database_url), storage)


@celery_app.task(name=EVALUATE_PLANS, bind=True, ignore_result=False)
def evaluate_plans(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Score a chunk of a job's plans (worker/evaluation_queue.py); the caller gathers the answers from the
    result backend. Runs on evaluation workers (``-A worker.evaluation_worker -Q evaluation``)."""
    from worker.evaluation_queue import evaluate_message

    return {"worker": self.request.hostname or "", "evaluations": evaluate_message(message, get_settings())}
