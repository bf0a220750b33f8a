"""The runner: one attempt at a job, stage by stage, to an outcome.

It claims the job (``run.claim``), restores what earlier attempts finished and runs the rest of its kind's
stages in order (a pruning job: ``stages.STAGE_FUNCS``; a policy training: ``training.STAGE_FUNCS``), then ends
the attempt:

- **succeeded** with the result;
- a ``HippError`` **fails** the job without retry (the caller must change the request);
- any other error **re-queues** it until ``max_attempts``, then fails it;
- ``Cancelled`` (or a cancel seen while an attempt fails) -> **cancelled**.

A policy training's policy row ends with its job, in the same transaction (``app.services.policies``).

Every final write is conditional on still holding the lease. Errors a tenant reads have server paths
redacted; tracebacks stay in the worker's log.

Torch-free at import: the stages (and with them the engine, torch and transformers: seconds, tens of seconds
on a busy machine) are imported when the first stage runs, after the claim and the fault hooks. So a job is
claimed, heartbeating and cancellable at once, and a worker that dies before its first stage (the fault tests'
``crash_at: load``) costs a retry no import.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sqlalchemy import update

from app.config import Settings
from app.db import session_factory
from app.models import KIND_STAGES, Event, Job, JobKind, JobStatus, utcnow
from app.queue import dispatch
from app.retention import delete_stage_outputs
from app.services.policies import end_training
from app.storage import get_storage
from worker.hipp.errors import HippError
from worker.hipp.progress import Cancelled
from worker.pipeline import faults
from worker.pipeline.context import JobContext
from worker.pipeline.run import JobRun, LeaseLost, Skipped, claim

log = logging.getLogger("hipp.pipeline")


def stages() -> ModuleType:
    """``worker.pipeline.stages``, imported on first use (see the module doc)."""
    from worker.pipeline import stages as module  # imports torch: deferred until a stage runs

    return module


Stages = tuple[dict[str, Callable[[JobContext], dict[str, Any]]], dict[str, Callable[[JobContext], None]]]


def pipeline(kind: str) -> Stages:
    """The stage functions of a job of ``kind`` and what a retry redoes for the finished ones (imported on
    first use, like :func:`stages`)."""
    if kind == JobKind.train_policy.value:
        from worker.pipeline import training  # imports torch, like stages

        return training.STAGE_FUNCS, training.RESTORE
    module = stages()
    return module.STAGE_FUNCS, module.RESTORE


def run_job(job_id: str | uuid.UUID, settings: Settings) -> str:
    """Run one job to an end state (or give it back for a retry). Returns what happened, for logs."""
    factory = session_factory(settings.resolved_database_url)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    job = claim(factory, uuid.UUID(str(job_id)), owner, settings.lease_s)
    if job is None:
        log.info("job %s: nothing to claim (already running, finished or cancelled)", job_id)
        return "not-claimed"
    run = JobRun(factory, job, owner, settings)
    work_dir = settings.resolved_work_dir / str(job.id)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(job=job, run=run, settings=settings, storage=get_storage(settings), work_dir=work_dir)
    completed = list(run.outputs.get("completed", []))
    if completed:
        ctx.result = dict(run.outputs.get("result") or {})
    ctx.result.setdefault("stages", {})
    order = KIND_STAGES[job.kind]
    remaining = [s for s in order if s not in completed]
    run.start_heartbeat()
    started = time.perf_counter()
    try:
        if completed:
            run.event(
                f"resuming at {remaining[0] if remaining else 'the end'}: reusing {', '.join(completed)}",
                data={"completed": completed},
            )
        for stage in order:
            run.check()
            if stage in completed:
                if remaining:
                    run.reused(stage, ctx.result["stages"].get(stage, {}).get("attempt"))
                    restore = pipeline(job.kind)[1].get(stage)
                    if restore is not None:
                        restore(ctx)
                continue
            if stage == faults.crash_at(settings, job):
                faults.kill(run.event, f"at {stage}")
            run.begin(stage)
            t0 = time.perf_counter()
            ctx.new_outputs, ctx.rows = {}, []
            try:
                data = pipeline(job.kind)[0][stage](ctx)
                seconds = time.perf_counter() - t0
                ctx.result["stages"][stage] = {"status": "done", "seconds": round(seconds, 3), "attempt": run.attempt}
                run.end(stage, seconds, data=data, result=ctx.result, outputs=ctx.new_outputs, rows=ctx.rows)
            except Skipped as skip:
                ctx.result["stages"][stage] = {"status": "skipped", "reason": str(skip), "attempt": run.attempt}
                run.end(stage, time.perf_counter() - t0, skipped=str(skip), result=ctx.result)
        run.check()
        ctx.result["seconds"] = round(time.perf_counter() - started, 3)
        return finish(run, JobStatus.succeeded, result=ctx.result, progress=1.0, stage=None)
    except LeaseLost as exc:
        log.warning("%s", exc)
        return "lease-lost"
    except Cancelled:
        run.stage_name = None
        run.event("cancelled at the caller's request")
        return finish(run, JobStatus.cancelled, result=ctx.result or None)
    except Exception as exc:
        return fail(run, job, exc, settings)
    finally:
        run.stop_heartbeat()
        shutil.rmtree(work_dir, ignore_errors=True)


def finish(run: JobRun, status: JobStatus, **values: Any) -> str:
    """The final status, with its ``job <status>`` event in the same transaction (a caller that sees the status
    sees the event), then the stage outputs deleted."""
    now = utcnow()
    with run.factory() as s:
        res = s.execute(
            update(Job)
            .where(
                Job.id == run.job_id,
                Job.lease_owner == run.owner,
                Job.status.in_([JobStatus.running.value, JobStatus.cancelling.value]),
            )
            .values(
                status=status.value,
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
                **values,
            )
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            s.rollback()
            return "lease-lost"
        s.add(Event(job_id=run.job_id, message=f"job {status.value}", data={}))
        if run.kind == JobKind.train_policy.value:
            end_training(s, run.job_id, status.value, trained_policy_values(status, values.get("result")))
        s.commit()
    run.stage_name = None
    delete_stage_outputs(get_storage(run.settings), run.factory, run.job_id)  # no retry will resume it
    return status.value


def trained_policy_values(status: JobStatus, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy row's ``uri``, ``fingerprint`` and ``metrics`` from a succeeded training's result."""
    policy = (result or {}).get("policy") if status is JobStatus.succeeded else None
    if not policy:
        return None
    return {"uri": policy["uri"], "fingerprint": policy["fingerprint"], "metrics": policy["metrics"]}


_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/:,;()\[\]]+/?)+")


def redact_paths(message: str, model: str) -> str:
    """Server paths out of a message a tenant reads (job error, events); the model reference the tenant
    named itself (a folder under ``HIPP_MODEL_DIRS``) stays."""
    def keep(path: str) -> bool:
        return model.startswith("/") and (path.rstrip("/") == model or path.startswith(model.rstrip("/") + "/"))

    return _ABS_PATH.sub(lambda m: m.group(0) if keep(m.group(0)) else "<server path>", message)


def fail(run: JobRun, job: Job, exc: Exception, settings: Settings) -> str:
    if run.cancel_requested():
        # Cancelled while this attempt was failing (e.g. during load): the caller's cancel wins.
        log.warning("job %s: attempt %s failed after a cancel request", run.job_id, job.attempt, exc_info=exc)
        run.stage_name = None
        run.event("cancelled at the caller's request")
        return finish(run, JobStatus.cancelled)
    code = getattr(exc, "code", "internal_error")
    message = redact_paths(str(exc) or type(exc).__name__, job.model)
    if isinstance(exc, HippError):
        run.event(f"failed: {message}", level="error", data={"code": code})
        return finish(run, JobStatus.failed, error={"code": code, "message": message, "retryable": False})
    # The traceback stays in the worker's log (it names server paths and code); tenants read events.
    log.error("job %s attempt %s failed", run.job_id, job.attempt, exc_info=exc)
    detail = {"type": type(exc).__name__}
    run.event(f"attempt {job.attempt} failed: {type(exc).__name__}: {message}", level="error", data=detail)
    if job.attempt < job.max_attempts:
        with run.factory() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == run.job_id, Job.lease_owner == run.owner, Job.status == JobStatus.running.value)
                .values(
                    status=JobStatus.queued.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    enqueued_at=None,
                    stage=None,
                    stage_progress=0.0,
                    progress=0.0,
                    updated_at=utcnow(),
                    error={"code": "internal_error", "message": message, "retryable": True},
                )
            )
            s.commit()
        if res.rowcount:  # type: ignore[attr-defined]
            dispatch(settings, run.factory, [run.job_id])
            return "requeued"
    return finish(
        run,
        JobStatus.failed,
        error={
            "code": "internal_error",
            "message": f"{type(exc).__name__}: {message} (after {job.attempt} attempts)",
            "retryable": True,
        },
    )
