"""One claimed attempt at a job, as the engine's ``Reporter``: its lease, heartbeat, events, progress,
cancellation and stage outputs.

- **claim**: a conditional UPDATE (queued -> running, attempt + 1, lease owner and expiry). A second delivery
  of the same job finds nothing to claim and returns.
- **heartbeat**: a thread renews ``heartbeat_at`` and the lease every ``HIPP_HEARTBEAT_S`` and reads the
  status every ``HIPP_CANCEL_POLL_S``, so a ``cancelling`` job stops at the engine's next ``reporter.check()``
  (between stages and inside the calibration, sensitivity, GRPO/search, recovery and evaluation loops).
  A worker that dies stops heartbeating; the reaper (app/reaper.py) re-queues its job when the lease expires.
- **events, progress**: every stage start/finish/skip is an event; the engine's progress ticks become
  ``stage_progress`` and overall ``progress`` (throttled writes).
- **stage outputs**: each finished stage is recorded in ``stage_outputs`` (``completed``, the partial result)
  in the same conditional UPDATE that ends it, with any artifact rows.

Every write is conditional on still holding the lease; a lost lease raises :class:`LeaseLost`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Artifact, Event, Job, JobKind, JobStatus, utcnow
from worker.hipp.progress import Reporter
from worker.pipeline import faults

log = logging.getLogger("hipp.pipeline")

# Share of overall progress per stage (sums to 1).
STAGE_WEIGHTS = {
    "load": 0.10,
    "sensitivity": 0.05,
    "plan": 0.35,
    "prune": 0.05,
    "recover": 0.20,
    "evaluate": 0.10,
    "upload": 0.15,
}
#: A policy training's share per stage: GRPO is nearly all of it.
TRAIN_STAGE_WEIGHTS = {"load": 0.05, "search_setup": 0.10, "train": 0.80, "register": 0.05}
KIND_WEIGHTS = {JobKind.prune.value: STAGE_WEIGHTS, JobKind.train_policy.value: TRAIN_STAGE_WEIGHTS}


class LeaseLost(Exception):
    """Another worker owns this job now; stop without touching it."""


class Skipped(Exception):
    """A stage did not run; the message says why (recorded as a skipped stage, not a failure)."""


class JobRun(Reporter):
    """One claimed attempt at a job: events, progress, heartbeats and cancellation, as an engine Reporter."""

    def __init__(self, factory: sessionmaker[Session], job: Job, owner: str, settings: Settings) -> None:
        self.factory = factory
        self.job_id = job.id
        self.owner = owner
        self.settings = settings
        self.attempt = job.attempt
        self.kind = job.kind
        self.weights = KIND_WEIGHTS[job.kind]
        self.crash_in = faults.crash_in(settings, job)
        self.crash_at_unit = faults.crash_in_unit(settings, job)
        self.outputs: dict[str, Any] = dict(job.stage_outputs or {})
        self.stage_name: str | None = None
        self.done_weight = 0.0
        self._last_write = 0.0
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, name="hipp-heartbeat", daemon=True)

    # lifecycle
    def start_heartbeat(self) -> None:
        self._hb.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._hb.is_alive():
            self._hb.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        tick = min(self.settings.heartbeat_s, self.settings.cancel_poll_s)
        last_beat = time.monotonic()
        while not self._stop.wait(tick):
            try:
                if time.monotonic() - last_beat >= self.settings.heartbeat_s - 1e-3:
                    last_beat = time.monotonic()
                    self.heartbeat()
                else:
                    self.poll_status()
            except Exception as exc:  # a missed beat is not fatal; the lease is longer than a beat
                log.warning("heartbeat failed for job %s: %s", self.job_id, exc)

    def cancel_requested(self) -> bool:
        """Whether the caller asked to cancel (read now, not at the next poll)."""
        try:
            self.poll_status()
        except Exception as exc:
            log.warning("status read failed for job %s: %s", self.job_id, exc)
        return self._cancel.is_set()

    def poll_status(self) -> None:
        """Read the status only (between heartbeats), so a cancel is seen within ``HIPP_CANCEL_POLL_S``."""
        with self.factory() as s:
            row = s.execute(select(Job.status, Job.lease_owner).where(Job.id == self.job_id)).first()
        if row is None or row[1] != self.owner:
            self._lost.set()
        elif row[0] == JobStatus.cancelling.value:
            self._cancel.set()

    def heartbeat(self) -> None:
        now = utcnow()
        with self.factory() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.lease_owner == self.owner)
                .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=self.settings.lease_s))
                .returning(Job.status)
            )
            row = res.first()
            s.commit()
        if row is None:
            self._lost.set()
        elif row[0] == JobStatus.cancelling.value:
            self._cancel.set()

    # writes
    def _update(self, **values: Any) -> None:
        with self.factory() as s:
            res = s.execute(update(Job).where(Job.id == self.job_id, Job.lease_owner == self.owner).values(**values))
            s.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            self._lost.set()
            raise LeaseLost(f"job {self.job_id} is no longer leased to {self.owner}")

    def event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with self.factory() as s:
            s.add(Event(job_id=self.job_id, stage=self.stage_name, level=level, message=message, data=data or {}))
            s.commit()

    def begin(self, stage: str) -> None:
        self.stage_name = stage
        self._update(stage=stage, stage_progress=0.0, progress=round(self.done_weight, 4), heartbeat_at=utcnow())
        self.event(f"{stage} started")

    def end(
        self,
        stage: str,
        seconds: float,
        skipped: str | None = None,
        data: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        rows: list[Artifact] | None = None,
    ) -> None:
        """Finish a stage: progress, and (with ``result``) mark it completed with the partial result and its
        outputs, plus any ``rows`` (the checkpoint's artifacts), in one transaction conditional on the lease."""
        self.done_weight += self.weights[stage]
        values: dict[str, Any] = {"stage_progress": 1.0, "progress": round(min(self.done_weight, 1.0), 4)}
        if result is not None:
            completed = [*self.outputs.get("completed", []), stage]
            values["stage_outputs"] = {**self.outputs, **(outputs or {}), "completed": completed, "result": result}
        with self.factory() as s:
            res = s.execute(update(Job).where(Job.id == self.job_id, Job.lease_owner == self.owner).values(**values))
            if not res.rowcount:  # type: ignore[attr-defined]
                s.rollback()
                self._lost.set()
                raise LeaseLost(f"job {self.job_id} is no longer leased to {self.owner}")
            if rows:
                s.execute(delete(Artifact).where(Artifact.job_id == self.job_id))
                s.add_all(rows)
            s.commit()
        if "stage_outputs" in values:
            self.outputs = values["stage_outputs"]
        payload = {"seconds": round(seconds, 3), **(data or {})}
        if skipped is not None:
            self.event(f"{stage} skipped: {skipped}", level="warning", data={**payload, "skipped": skipped})
        else:
            self.event(f"{stage} finished in {seconds:.1f}s", data=payload)

    def save_stage_output(self, stage: str, key: Any) -> None:
        outputs = {**self.outputs, stage: key}
        self._update(stage_outputs=outputs)
        self.outputs = outputs

    def reused(self, stage: str, attempt: int | None) -> None:
        """A stage finished by an earlier attempt: counted as done, not run again."""
        self.stage_name = stage
        self.done_weight += self.weights[stage]
        self._update(stage=stage, stage_progress=1.0, progress=round(min(self.done_weight, 1.0), 4))
        self.event(f"{stage} reused (finished by attempt {attempt})", data={"reused": True, "attempt": attempt})

    # Reporter hooks (called by the engine)
    def stage(self, name: str, message: str = "") -> None:
        self.event(f"{name}: {message}".rstrip(": "), data={"substage": name})

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        if self.crash_in is not None and self.stage_name == self.crash_in and done >= self.crash_at_unit:
            faults.kill(self.event, f"inside {self.stage_name}")
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and now - self._last_write < 0.5:
            return
        self._last_write = now
        frac = min(done / total, 1.0) if total else 0.0
        weight = self.weights.get(self.stage_name or "", 0.0)
        self._update(stage_progress=round(frac, 4), progress=round(min(self.done_weight + weight * frac, 1.0), 4))

    def log(self, message: str) -> None:
        self.event(message)

    def should_stop(self) -> bool:
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id} is no longer leased to {self.owner}")
        return self._cancel.is_set()


def claim(factory: sessionmaker[Session], job_id: uuid.UUID, owner: str, lease_s: int) -> Job | None:
    """queued -> running for exactly one caller (conditional UPDATE); None when there is nothing to claim."""
    now = utcnow()
    with factory() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.attempt < Job.max_attempts)
            .values(
                status=JobStatus.running.value,
                attempt=Job.attempt + 1,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_s),
                heartbeat_at=now,
                updated_at=now,
                error=None,
            )
            .returning(Job.id)
        )
        claimed = res.first() is not None
        if claimed:
            s.execute(update(Job).where(Job.id == job_id, Job.started_at.is_(None)).values(started_at=now))
        s.commit()
        if not claimed:
            return None
        job = s.get(Job, job_id)
        assert job is not None
        s.add(Event(job_id=job_id, message=f"attempt {job.attempt} of {job.max_attempts} started by {owner}"))
        s.commit()
        return job
