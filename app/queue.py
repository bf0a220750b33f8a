"""Talking to the broker: the Celery client configuration shared by API and worker, and the job outbox.

The API enqueues by task name (``hipp.run_job``) and never imports the worker's code. A job row is committed
first with ``enqueued_at`` NULL; after the commit the job is published and ``enqueued_at`` set. If the publish
fails (broker down, process killed between the two), the relay (``relay_pending``, run by beat and at
``hipp serve`` start) publishes it again. A queued job whose message was lost (a broker restarted without
persistence) is re-published ``HIPP_REQUEUE_AFTER_S`` after its enqueue. A job delivered twice is harmless:
the worker claims it with a conditional UPDATE and the second delivery finds nothing to claim.

Nothing here is cached per process: the publishing client (``make_celery_client``) and the ``Dispatcher`` are
built once by the API's runtime (app/runtime.py). Functions that publish take that client as ``broker``; without
one (callers that hold no runtime) they build a client for the call and close it after.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import and_, func, insert, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Event, Job, JobStatus, utcnow

log = logging.getLogger("hipp.queue")

RUN_JOB = "hipp.run_job"
RELAY = "hipp.relay_pending"
REAP = "hipp.reap_stale"
SWEEP = "hipp.retention_sweep"
VALIDATE_DATASET = "hipp.validate_dataset"
EVALUATE_PLANS = "hipp.evaluate_plans"
#: How long evaluation answers stay in the result backend (the caller reads them at once and forgets them).
EVALUATION_RESULT_EXPIRES_S = 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "task_default_queue": settings.default_queue,
        "task_routes": {
            RUN_JOB: {"queue": settings.gpu_queue},
            VALIDATE_DATASET: {"queue": settings.default_queue},
            EVALUATE_PLANS: {"queue": settings.evaluation_queue},
        },
        # Only plan evaluations return results (``evaluation_client``; the workers' app); every other task's
        # outcome lives in Postgres. No backend here: with one, ``send_task`` subscribes the publishing client to
        # each sent task's result, and the API would collect a subscription per job it publishes.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
        "timezone": "UTC",
    }
    if settings.embedded_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.2,
        }
    else:
        conf["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    return conf


def make_celery_client(settings: Settings) -> Celery:
    """A publishing-only Celery app for the settings' broker (the API never imports the worker's code)."""
    app = Celery("hipp-api", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def result_settings(settings: Settings) -> dict[str, Any]:
    """The result backend of plan evaluations: the evaluation workers store answers there, the job reads them."""
    return {"result_backend": settings.resolved_result_backend, "result_expires": EVALUATION_RESULT_EXPIRES_S}


def evaluation_client(settings: Settings) -> Celery:
    """A client that sends plan evaluations and gathers their answers (``worker/evaluation_queue.py``)."""
    app = make_celery_client(settings)
    app.conf.update(result_settings(settings))
    return app


@contextmanager
def broker_or_temporary(settings: Settings, broker: Celery | None) -> Iterator[Celery]:
    """``broker`` itself, or a client built for this call and closed after it (its pooled connections)."""
    if broker is not None:
        yield broker
        return
    temporary = make_celery_client(settings)
    try:
        yield temporary
    finally:
        temporary.close()


def publish(settings: Settings, job_id: uuid.UUID, broker: Celery | None = None) -> None:
    with broker_or_temporary(settings, broker) as client:
        client.send_task(RUN_JOB, args=[str(job_id)], queue=settings.gpu_queue)


def publish_dataset_validation(settings: Settings, dataset_id: uuid.UUID, broker: Celery | None = None) -> None:
    """Send a data set to the light queue's validation task (by name: the API never imports the worker)."""
    with broker_or_temporary(settings, broker) as client:
        client.send_task(VALIDATE_DATASET, args=[str(dataset_id)], queue=settings.default_queue)


def fair_subset(session: Session, settings: Settings, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The jobs of ``job_ids`` that may be published now, oldest first: at most
    ``HIPP_MAX_WAITING_PER_TENANT`` published-but-unclaimed messages per tenant sit in the broker. The rest
    stay queued with ``enqueued_at`` NULL and are published by the relay (beat, and every worker when a job
    ends) as the tenant's earlier jobs are claimed. A broker queue is FIFO; this keeps one tenant's backlog
    out of it, so another tenant's job waits behind at most that many of each tenant's jobs."""
    cap = settings.max_waiting_per_tenant
    if cap <= 0 or not job_ids:
        return job_ids
    rows = session.execute(
        select(Job.id, Job.tenant_id, Job.created_at).where(Job.id.in_(job_ids), Job.status == JobStatus.queued.value)
    ).all()
    tenants = {r.tenant_id for r in rows}
    waiting: dict[uuid.UUID, int] = {
        tenant: int(n)
        for tenant, n in session.execute(
            select(Job.tenant_id, func.count())
            .where(
                Job.tenant_id.in_(tenants),
                Job.status == JobStatus.queued.value,
                Job.enqueued_at.is_not(None),
                Job.id.not_in(job_ids),
            )
            .group_by(Job.tenant_id)
        ).all()
    }
    out = []
    for r in sorted(rows, key=lambda r: (r.created_at, r.id)):
        if waiting.get(r.tenant_id, 0) < cap:
            out.append(r.id)
            waiting[r.tenant_id] = waiting.get(r.tenant_id, 0) + 1
    return out


def dispatch(
    settings: Settings, factory: sessionmaker[Session], job_ids: Iterable[uuid.UUID], broker: Celery | None = None
) -> int:
    """Publish committed jobs (as many as the per-tenant fair share allows, see ``fair_subset``) through
    ``broker`` (default: a client for this call) and mark them enqueued (one UPDATE for the batch). Returns
    how many."""
    ids = list(job_ids)
    if settings.max_waiting_per_tenant > 0 and ids:
        with factory() as session:
            ids = fair_subset(session, settings, ids)
    if not ids:
        return 0
    sent: list[uuid.UUID] = []
    with broker_or_temporary(settings, broker) as client:
        for job_id in ids:
            try:
                publish(settings, job_id, client)
            except Exception as exc:  # the relay will retry; the request already succeeded
                log.warning("could not enqueue job %s (%s); the relay will retry", job_id, exc)
                continue
            sent.append(job_id)
    if sent:
        with factory() as session:
            if session.get_bind().dialect.name == "postgresql":
                # The marker only saves the relay a re-publish (harmless: claiming is conditional), so it
                # need not wait for the WAL flush.
                session.execute(text("SET LOCAL synchronous_commit = off"))
            now = utcnow()
            session.execute(update(Job).where(Job.id.in_(sent)).values(enqueued_at=now))
            session.execute(
                insert(Event),
                [
                    {"job_id": i, "created_at": now, "level": "info", "message": "job enqueued", "data": {}}
                    for i in sent
                ],
            )
            session.commit()
    return len(sent)


class Dispatcher:
    """Publishes jobs off the request path: routes hand over committed job ids and return at once; one
    thread (per runtime) drains them in batches through ``broker``. Ids lost with the process are re-sent by
    the relay."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], broker: Celery) -> None:
        self.settings = settings
        self.factory = factory
        self.broker = broker
        self.pending: queue.Queue[uuid.UUID | None] = queue.Queue()  # None: stop
        self.linger_s = 0.02
        self.thread = threading.Thread(target=self._loop, name="hipp-dispatcher", daemon=True)
        self.thread.start()

    def submit(self, job_id: uuid.UUID) -> None:
        self.pending.put(job_id)

    def _loop(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if batch:
                try:
                    dispatch(self.settings, self.factory, batch, self.broker)
                except Exception as exc:
                    log.warning("dispatch of %d jobs failed (%s); the relay will retry", len(batch), exc)
            for _ in range(len(batch) + stop):
                self.pending.task_done()
            if stop:
                return

    def _next_batch(self) -> tuple[list[uuid.UUID], bool]:
        """The ids handed over next (at most 100), and whether ``close`` asked the thread to stop."""
        first = self.pending.get()
        if first is None:  # ``close``: no more ids
            return [], True
        batch = [first]
        # Linger briefly so that under load one transaction marks many jobs enqueued.
        deadline = time.monotonic() + self.linger_s
        while len(batch) < 100:
            try:
                more = self.pending.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed over so far is published (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.pending.unfinished_tasks

    def close(self, timeout: float = 5.0) -> None:
        """Publish what was handed over (up to ``timeout``), then stop the thread."""
        self.pending.put(None)
        self.thread.join(timeout)


def still_queued(settings: Settings, job_id: str) -> bool:
    """Whether a delivered job can still be claimed (queued, attempts left). The worker's main process asks
    before handing a message to its pool, so a cancelled or finished job costs no child process. One unpooled
    connection for the question (the pool children are forked from this process; messages come at the rate
    of jobs). True when the database cannot say."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(settings.resolved_database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(Job.status, Job.attempt, Job.max_attempts).where(Job.id == uuid.UUID(str(job_id)))
            ).first()
    except Exception as exc:
        log.warning("could not check job %s before running it (%s); running it", job_id, exc)
        return True
    finally:
        engine.dispose()
    return row is not None and row.status == JobStatus.queued.value and row.attempt < row.max_attempts


def relay_pending(
    settings: Settings, factory: sessionmaker[Session], min_age_s: float | None = None, broker: Celery | None = None
) -> int:
    """Re-publish queued jobs that were committed but never marked enqueued, and queued jobs enqueued more
    than ``HIPP_REQUEUE_AFTER_S`` ago (their message may have been lost with a broker restart; a duplicate
    is harmless: only one delivery can claim the job)."""
    age = settings.enqueue_retry_s if min_age_s is None else min_age_s
    now = utcnow()
    with factory() as session:
        ids = list(
            session.scalars(
                select(Job.id).where(
                    Job.status == JobStatus.queued.value,
                    or_(
                        and_(Job.enqueued_at.is_(None), Job.updated_at <= now - timedelta(seconds=age)),
                        Job.enqueued_at <= now - timedelta(seconds=settings.requeue_after_s),
                    ),
                )
            )
        )
    return dispatch(settings, factory, ids, broker)
