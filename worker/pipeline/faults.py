"""Fault injection for tests (``HIPP_FAULT_INJECTION``, off by default): a job whose metadata has
``{"fault": {"crash_at": STAGE}}`` SIGKILLs its worker process when that stage starts (every attempt);
``{"fault": {"crash_in": STAGE, "attempts": [1]}}`` at the first unit of progress inside STAGE on the listed
attempts (default: the first) - a kill -9 at a known point in the middle of a stage, whatever the machine's
speed; with ``"at": N``, at the first progress report of N or more units instead (e.g. after GRPO step N, when
step N-1's checkpoint is in storage)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from app.config import Settings
from app.models import Job


def _fault(settings: Settings, job: Job) -> dict[str, Any]:
    fault = (job.meta or {}).get("fault") if settings.fault_injection else None
    return fault if isinstance(fault, dict) else {}


def crash_at(settings: Settings, job: Job) -> str | None:
    """The stage whose start kills the worker, if any."""
    stage = _fault(settings, job).get("crash_at")
    return str(stage) if stage else None


def crash_in(settings: Settings, job: Job) -> str | None:
    """The stage inside which the first progress kills the worker on this attempt, if any."""
    fault = _fault(settings, job)
    if not fault.get("crash_in") or job.attempt not in fault.get("attempts", [1]):
        return None
    return str(fault["crash_in"])


def crash_in_unit(settings: Settings, job: Job) -> int:
    """How many units of progress inside the ``crash_in`` stage come before the kill (default 1)."""
    at = _fault(settings, job).get("at", 1)
    return at if isinstance(at, int) and at >= 1 else 1


def kill(event: Callable[..., None], where: str) -> None:
    """Record the kill as a job event, then SIGKILL this process."""
    event(f"fault injection: killing worker process {os.getpid()} {where}", level="warning")
    os.kill(os.getpid(), signal.SIGKILL)
