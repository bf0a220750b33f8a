"""Retention: what the service stores for a job, and when it is deleted.

- Stage outputs (``jobs/{id}/stages/``: sensitivity, plans, the pruned and recovered weights, each up to the
  size of a checkpoint) exist only so that a retry can resume; they are deleted when the job ends
  (succeeded, failed for good, cancelled): by the worker as it finishes the job, by the reaper for jobs it
  ends, and by the beat sweep (``sweep``) for anything left (a job cancelled while queued, a crash).
- Artifacts (the checkpoint archive, plan, metrics) are kept ``HIPP_ARTIFACT_RETENTION_S`` after the job
  finished, then deleted by the same sweep (0 = kept until the job is deleted); the job row and its events
  stay, with an event saying the artifacts expired.
- ``DELETE /jobs/{id}`` of a finished job deletes its files and its row (events and artifacts with it).
- ``usage``: a tenant's jobs, artifacts and stored bytes (``GET /usage``).

No torch here: the API and beat run this.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Text, cast, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import TERMINAL, Artifact, Event, Job, utcnow
from app.storage import Storage

log = logging.getLogger("hipp.retention")
FINISHED = [s.value for s in TERMINAL]


def stage_prefix(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/stages/"


def job_prefix(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/"


def delete_stage_outputs(storage: Storage, factory: sessionmaker[Session], job_id: uuid.UUID) -> int:
    """Delete a finished job's stage outputs and forget their keys (best effort: the sweep retries)."""
    try:
        n = storage.delete_prefix(stage_prefix(job_id))
    except Exception as exc:
        log.warning("could not delete the stage outputs of job %s: %s", job_id, exc)
        return 0
    with factory() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status.in_(FINISHED)).values(stage_outputs={}))
        s.commit()
    return n


@dataclass
class Swept:
    stage_outputs: int = 0
    artifacts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"stage_outputs": self.stage_outputs, "artifacts": self.artifacts}


def sweep(settings: Settings, factory: sessionmaker[Session], storage: Storage, limit: int = 200) -> Swept:
    """Beat: delete stage outputs of finished jobs that still have them, and artifacts past retention."""
    out = Swept()
    with factory() as s:
        leftover = list(
            s.scalars(
                select(Job.id)
                .where(Job.status.in_(FINISHED), cast(Job.stage_outputs, Text).not_in(["{}", "null"]))
                .limit(limit)
            )
        )
    for job_id in leftover:
        delete_stage_outputs(storage, factory, job_id)
        out.stage_outputs += 1
    if settings.artifact_retention_s > 0:
        cutoff = utcnow() - timedelta(seconds=settings.artifact_retention_s)
        with factory() as s:
            rows = s.execute(
                select(Artifact.job_id, func.count(), func.sum(Artifact.size))
                .join(Job, Job.id == Artifact.job_id)
                .where(Job.status.in_(FINISHED), Job.finished_at < cutoff)
                .group_by(Artifact.job_id)
                .limit(limit)
            ).all()
        for job_id, count, size in rows:
            try:
                storage.delete_prefix(job_prefix(job_id))
            except Exception as exc:
                log.warning("could not delete the artifacts of job %s: %s", job_id, exc)
                continue
            with factory() as s:
                s.execute(delete(Artifact).where(Artifact.job_id == job_id))
                s.add(
                    Event(
                        job_id=job_id,
                        level="info",
                        message=f"artifacts deleted: {settings.artifact_retention_s} s retention passed",
                        data={"artifacts": int(count), "bytes": int(size or 0)},
                    )
                )
                s.commit()
            out.artifacts += int(count)
    if out.stage_outputs or out.artifacts:
        log.info("retention sweep: %s", out.as_dict())
    return out


def delete_job_files(storage: Storage, job_id: uuid.UUID) -> int:
    return storage.delete_prefix(job_prefix(job_id))


def usage(session: Session, tenant_id: uuid.UUID) -> dict[str, Any]:
    jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)) or 0
    count, size = session.execute(
        select(func.count(), func.sum(Artifact.size))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id)
    ).one()
    return {"jobs": int(jobs), "artifacts": int(count or 0), "artifact_bytes": int(size or 0)}
