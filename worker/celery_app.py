"""The Celery app: ``celery -A worker.celery_app worker -Q gpu`` (GPU work) and ``-Q default`` (light work).

Prefork, one process per GPU (concurrency 1), one task per child (a fresh process per job: GPU memory is
returned when it exits), prefetch 1 with late acks (a worker holds at most the job it runs). Torch is imported
inside the task, never here. The database engine is built once per process, after the fork.
Beat runs the outbox relay and the reaper (app/reaper.py: stale heartbeats re-queued, failed after the
attempt cap) on the default queue; run it as ``celery -A worker.celery_app beat`` next to a ``-Q default``
worker (or ``worker -B`` for the light worker: that beat dies with its worker, even a kill -9).
Evaluation workers (``-Q evaluation``) run with their own settings: ``-A worker.evaluation_worker``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.platforms import set_pdeathsig
from celery.signals import beat_embedded_init, worker_process_init

from app.config import get_settings
from app.db import dispose_all
from app.queue import EVALUATE_PLANS, REAP, RELAY, RUN_JOB, SWEEP, VALIDATE_DATASET, celery_config, result_settings

settings = get_settings()

celery_app = Celery("hipp", include=["worker.tasks"])
celery_app.conf.update(celery_config(settings))
celery_app.conf.update(result_settings(settings))  # where hipp.evaluate_plans answers (nothing else stores any)
celery_app.conf.update(
    task_routes={
        RUN_JOB: {"queue": settings.gpu_queue},
        RELAY: {"queue": settings.default_queue},
        REAP: {"queue": settings.default_queue},
        SWEEP: {"queue": settings.default_queue},
        VALIDATE_DATASET: {"queue": settings.default_queue},
        EVALUATE_PLANS: {"queue": settings.evaluation_queue},
    },
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=1,
    worker_concurrency=1,
    worker_pool="prefork",
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    worker_enable_remote_control=not settings.embedded_broker,
    beat_schedule={
        "relay-pending-jobs": {"task": RELAY, "schedule": max(5.0, settings.enqueue_retry_s / 2)},
        # Expiring so that a backlog (light worker down) does not pile up reaper runs.
        "reap-stale-jobs": {
            "task": REAP,
            "schedule": settings.reap_interval_s,
            "options": {"expires": max(settings.reap_interval_s, 5.0)},
        },
        # Stage outputs of finished jobs, artifacts past HIPP_ARTIFACT_RETENTION_S (app/retention.py).
        "retention-sweep": {
            "task": SWEEP,
            "schedule": settings.retention_interval_s,
            "options": {"expires": max(settings.retention_interval_s, 5.0)},
        },
    },
)
app = celery_app


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked child must not share the parent's pooled database connections."""
    dispose_all()


_MAIN_PID = os.getpid()  # the worker's main process (imported before it forks beat and the pool)


@beat_embedded_init.connect
def _die_with_the_worker(**_: Any) -> None:
    """The beat of ``worker -B`` is a child process; Celery gives its pool children a parent-death signal but
    not beat, so a kill -9 of the worker left the scheduler running and a restart ran two. Beat now gets
    SIGKILL when the worker dies (and exits at once if the worker died before this ran)."""
    set_pdeathsig("SIGKILL")
    if os.getppid() != _MAIN_PID:
        os._exit(0)
