"""The reaper: jobs whose worker stopped heartbeating are re-queued, or failed after the attempt cap.

A running job's worker renews ``lease_expires_at`` with every heartbeat. When the lease has expired the
worker is gone (killed, out of memory, machine lost, network partition): beat runs ``reap_stale`` every
``HIPP_REAP_INTERVAL_S`` and, for each such job, with one conditional UPDATE that also requires the lease to
still be the expired one (so a worker that comes back cannot be overtaken twice):

- ``cancelling`` -> ``cancelled`` (the caller asked to stop; there is nothing to resume);
- ``running`` with attempts left -> ``queued`` (lease cleared, ``enqueued_at`` NULL), then published like a
  new job (the outbox relay re-sends it if that publish fails); the retry resumes from its last finished
  stage (worker/pipeline/);
- ``running`` at ``max_attempts`` -> ``failed`` with error code ``attempts_exhausted`` (retryable false):
  a job that kills its worker every time (an out-of-memory model) does not loop forever.

No torch here: the reaper runs in the light worker.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Event, Job, JobStatus, utcnow
from app.queue import dispatch
from app.services.policies import end_training

if TYPE_CHECKING:
    from celery import Celery

    from app.storage import Storage

log = logging.getLogger("hipp.reaper")


@dataclass
class Reaped:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"requeued": len(self.requeued), "failed": len(self.failed), "cancelled": len(self.cancelled)}


def reap_stale(
    settings: Settings, factory: sessionmaker[Session], broker: Celery | None = None, storage: Storage | None = None
) -> Reaped:
    """Re-queue, fail or cancel every running/cancelling job whose lease has expired. Re-queued jobs are
    published through ``broker``, stage outputs of ended ones deleted from ``storage`` (defaults: built for
    this call from ``settings``)."""
    now = utcnow()
    out = Reaped()
    with factory() as s:
        rows = s.execute(
            select(Job.id, Job.status, Job.attempt, Job.max_attempts, Job.lease_owner, Job.stage, Job.heartbeat_at)
            .where(
                Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value]),
                Job.lease_expires_at < now,
            )
            .limit(500)
        ).all()
        for row in rows:
            seen = row.heartbeat_at.isoformat() if row.heartbeat_at else "never"
            who = f"worker {row.lease_owner} stopped heartbeating (last heartbeat {seen}, stage {row.stage})"
            values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
            if row.status == JobStatus.cancelling.value:
                target, bucket, level = JobStatus.cancelled, out.cancelled, "warning"
                values.update(finished_at=now)
                message = f"{who}; the job was being cancelled: cancelled"
            elif row.attempt < row.max_attempts:
                target, bucket, level = JobStatus.queued, out.requeued, "warning"
                values.update(
                    enqueued_at=None,
                    stage=None,
                    stage_progress=0.0,
                    error={"code": "worker_lost", "message": who, "retryable": True},
                )
                message = f"{who}; re-queued (attempt {row.attempt} of {row.max_attempts} lost)"
            else:
                target, bucket, level = JobStatus.failed, out.failed, "error"
                message = (
                    f"{who} on attempt {row.attempt} of {row.max_attempts}; giving up (the job may need more memory "
                    "than the worker has, or crashes it)"
                )
                values.update(
                    finished_at=now, error={"code": "attempts_exhausted", "message": message, "retryable": False}
                )
            owner_matches = Job.lease_owner == row.lease_owner if row.lease_owner else Job.lease_owner.is_(None)
            res = s.execute(
                update(Job)
                .where(Job.id == row.id, Job.status == row.status, owner_matches, Job.lease_expires_at < now)
                .values(status=target.value, **values)
            )
            if res.rowcount:  # type: ignore[attr-defined]
                bucket.append(row.id)
                s.add(Event(job_id=row.id, level=level, stage=row.stage, message=message, data={"reaper": True}))
                if target is not JobStatus.queued:
                    s.add(Event(job_id=row.id, message=f"job {target.value}"))
                    end_training(s, row.id, target.value)  # a policy training's policy ends with its job
        s.commit()
    if out.requeued:
        dispatch(settings, factory, out.requeued, broker)
    if out.failed or out.cancelled:
        from app.retention import delete_stage_outputs
        from app.storage import open_storage

        store = storage or open_storage(settings)
        for job_id in [*out.failed, *out.cancelled]:  # no retry will resume them
            delete_stage_outputs(store, factory, job_id)
    if rows:
        log.warning("reaper: %s", out.as_dict())
    return out
