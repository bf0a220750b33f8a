"""The job pipeline: load -> sensitivity -> plan -> prune -> recover -> evaluate -> upload.

Each stage is a small function that calls the engine (``worker.hipp``) and never re-implements it. The
runner around them owns the job row:

- **claim**: a conditional UPDATE (queued -> running, attempt + 1, lease owner and expiry). A second delivery
  of the same job finds nothing to claim and returns.
- **heartbeat**: a thread renews ``heartbeat_at`` and the lease every ``HIPP_HEARTBEAT_S`` and reads the
  status every ``HIPP_CANCEL_POLL_S``, so a ``cancelling`` job stops at the engine's next ``reporter.check()``
  (between stages and inside the calibration, sensitivity, GRPO/search, recovery and evaluation loops).
  A worker that dies stops heartbeating; the reaper (app/reaper.py) re-queues its job when the lease expires.
- **events, progress**: every stage start/finish/skip is an event; the engine's progress ticks become
  ``stage_progress`` and overall ``progress`` (throttled writes).
- **stage outputs and resume**: each finished stage is recorded in ``stage_outputs`` (``completed``, the
  partial result) in the same conditional UPDATE that ends it; its outputs are in object storage (sensitivity,
  plan, the pruned weights after prune, the recovered weights after recover, with their SHA-256). A retry
  reloads the model, restores the plan and the latest weights (checked against their SHA-256) and restarts at
  the first unfinished stage. The checkpoint's artifact rows are written in the transaction that completes
  ``upload``, so the final checkpoint is recorded once.
- **fault injection** (tests only, ``HIPP_FAULT_INJECTION``, off by default): a job whose metadata has
  ``{"fault": {"crash_at": STAGE}}`` SIGKILLs its worker process when that stage starts (every attempt);
  ``{"fault": {"crash_in": STAGE, "attempts": [1]}}`` at the first progress inside STAGE on those attempts.
- **outcome**: succeeded with a result; a ``HippError`` fails the job without retry (the caller must change
  the request); any other error re-queues the job until ``max_attempts``; ``Cancelled`` -> cancelled.
  Every final write is conditional on still holding the lease.

A stage whose engine part does not exist yet records that it was skipped and why; results are never faked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import session_factory
from app.models import STAGES, Artifact, Event, Job, JobStatus, Policy, utcnow
from app.queue import dispatch
from app.storage import Storage, get_storage
from worker.hipp.progress import Cancelled, Reporter

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
# Preference -> target sparsity for the baseline allocator: all compression -> SPARSITY_MAX.
SPARSITY_MIN, SPARSITY_MAX = 0.05, 0.6
CALIBRATION_SAMPLES = 16
POLICY_SAMPLES = 8  # sampled plans per job, besides the policy's mean plan


class Skipped(Exception):
    """A stage did not run; the message says why."""


class LeaseLost(Exception):
    """Another worker owns this job now; stop without touching it."""


# --- the job's view of the database ------------------------------------------------------------------------
class JobRun(Reporter):
    """One claimed attempt at a job: events, progress, heartbeats and cancellation, as an engine Reporter."""

    def __init__(self, factory: sessionmaker[Session], job: Job, owner: str, settings: Settings) -> None:
        self.factory = factory
        self.job_id = job.id
        self.owner = owner
        self.settings = settings
        self.attempt = job.attempt
        self.crash_in = mid_stage_fault(settings, job)
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
        rows: list[Any] | None = None,
    ) -> None:
        """Finish a stage: progress, and (with ``result``) mark it completed with the partial result and its
        outputs, plus any ``rows`` (the checkpoint's artifacts), in one transaction conditional on the lease."""
        self.done_weight += STAGE_WEIGHTS[stage]
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

    def save_stage_output(self, stage: str, key: str) -> None:
        outputs = {**self.outputs, stage: key}
        self._update(stage_outputs=outputs)
        self.outputs = outputs

    def reused(self, stage: str, attempt: int | None) -> None:
        """A stage finished by an earlier attempt: counted as done, not run again."""
        self.stage_name = stage
        self.done_weight += STAGE_WEIGHTS[stage]
        self._update(stage=stage, stage_progress=1.0, progress=round(min(self.done_weight, 1.0), 4))
        self.event(f"{stage} reused (finished by attempt {attempt})", data={"reused": True, "attempt": attempt})

    # Reporter hooks (called by the engine)
    def stage(self, name: str, message: str = "") -> None:
        self.event(f"{name}: {message}".rstrip(": "), data={"substage": name})

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        if self.crash_in is not None and self.stage_name == self.crash_in and done >= 1:
            self.event(f"fault injection: killing worker process {os.getpid()} inside {self.stage_name}",
                       level="warning")
            os.kill(os.getpid(), signal.SIGKILL)
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and now - self._last_write < 0.5:
            return
        self._last_write = now
        frac = min(done / total, 1.0) if total else 0.0
        weight = STAGE_WEIGHTS.get(self.stage_name or "", 0.0)
        self._update(stage_progress=round(frac, 4), progress=round(min(self.done_weight + weight * frac, 1.0), 4))

    def log(self, message: str) -> None:
        self.event(message)

    def should_stop(self) -> bool:
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id} is no longer leased to {self.owner}")
        return self._cancel.is_set()


# --- what the stages share ----------------------------------------------------------------------------------
@dataclass
class JobContext:
    job: Job
    run: JobRun
    settings: Settings
    storage: Storage
    work_dir: Path
    loaded: Any = None
    plan: Any = None
    result: dict[str, Any] = field(default_factory=dict)
    new_outputs: dict[str, Any] = field(default_factory=dict)  # recorded when the current stage completes
    rows: list[Any] = field(default_factory=list)  # artifact rows, written when the current stage completes


def calibration_option(ctx: JobContext, name: str, default: int) -> int:
    return int((ctx.job.options.get("calibration") or {}).get(name, default))


def calibration_samples(ctx: JobContext, count: int) -> list[Any]:
    """The engine's calibration choice for the job's model; a warning in the result when it is not the
    model's own distribution."""
    from worker.hipp.calibration_source import choose_calibration

    choice = choose_calibration(ctx.job.model, count)
    ctx.result["calibration"] = {"source": choice.source, "warning": choice.warning}
    return choice.samples


def evaluation_enabled(ctx: JobContext) -> bool:
    return bool(ctx.job.options.get("evaluation", {}).get("enabled", True))


def evaluate_model(ctx: JobContext, model: Any) -> dict[str, Any]:
    """POPE and ScienceQA-style accuracy on the world benchmarks (written once per job, ``max_samples``
    questions per split), scored from first-token logits."""
    from worker.hipp.evaluation.runner import evaluate
    from worker.hipp.testbed.data import write_benchmarks

    n = int(ctx.job.options.get("evaluation", {}).get("max_samples", 16))
    bench = ctx.work_dir / "benchmarks"
    if not (bench / "scienceqa").exists():
        write_benchmarks(bench, pope_images=max(1, -(-n // 6)), sqa_sizes={"test": n})
    return evaluate(
        model, ctx.loaded.processor, bench / "pope", bench / "scienceqa", limit=n, batch_size=16, report=ctx.run
    )


def worker_device(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(ctx: JobContext) -> Any:
    from worker.hipp.models.loading import load_model

    with hub_ids_from_the_hub(ctx.job.model):
        return load_model(ctx.job.model, dtype=ctx.settings.dtype, device=worker_device(ctx.settings))


@contextmanager
def hub_ids_from_the_hub(ref: str) -> Iterator[None]:
    """A reference that is neither a built-in name nor an absolute path (the API only lets folders under
    ``HIPP_MODEL_DIRS`` through, as absolute paths) is a hub id: it is loaded in an empty directory, so an
    ``org/name`` that happens to be a folder relative to the worker's directory is never read."""
    from worker.hipp.models import builtin

    if ref in builtin.BUILTINS or ref == "testbed" or Path(ref).is_absolute():
        yield
        return
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="hipp-hub-") as empty:
        os.chdir(empty)
        try:
            yield
        finally:
            os.chdir(old)


def stage_load(ctx: JobContext) -> dict[str, Any]:
    from worker.hipp.evaluation.latency import prompt_latency

    ctx.loaded = load(ctx)
    ctx.result["device"] = str(ctx.loaded.device)
    params = sum(p.numel() for p in ctx.loaded.model.parameters())
    ctx.result["dense"] = {"parameters": params}
    if evaluation_enabled(ctx):
        ctx.run.event("evaluating the dense model (baseline for the metrics)")
        ctx.result["dense"]["metrics"] = evaluate_model(ctx, ctx.loaded.model)
    ctx.result["dense"]["latency"] = prompt_latency(ctx.loaded)
    return {"parameters": params, "adapter": type(ctx.loaded.adapter).__name__, "device": ctx.result["device"]}


def stage_sensitivity(ctx: JobContext) -> dict[str, Any]:
    """Visual sensitivity per decoder layer (attention flow), saved with the job's stage outputs. The
    baseline allocator does not consume it; a policy will."""
    from worker.hipp.sensitivity import compute_visual_sensitivity

    samples = calibration_samples(ctx, calibration_option(ctx, "sensitivity_samples", 8))
    result = compute_visual_sensitivity(ctx.loaded, samples, batch_size=4, reporter=ctx.run)
    key = f"jobs/{ctx.job.id}/stages/sensitivity.json"
    ctx.storage.put_bytes(key, json.dumps(result.to_dict()).encode(), "application/json")
    ctx.run.save_stage_output("sensitivity", key)
    ctx.result["sensitivity"] = {"direct": result.direct, "increment": result.increment, "samples": result.samples}
    return {"layers": result.num_layers, "samples": result.samples}


def baseline_sparsity(preference: dict[str, float], ceiling: float) -> float:
    """Matched sparsity for the baseline allocator: linear in the compression weight, capped below the
    model's ceiling (utility and robustness weights pull it towards ``SPARSITY_MIN``)."""
    s = SPARSITY_MIN + (SPARSITY_MAX - SPARSITY_MIN) * float(preference.get("compression", 0.0))
    return round(min(s, 0.95 * ceiling), 4)


def registered_policy(ctx: JobContext) -> Policy | None:
    """The tenant's newest policy registered (POST /policies) for this model reference."""
    with ctx.run.factory() as s:
        return s.scalar(
            select(Policy)
            .where(Policy.tenant_id == ctx.job.tenant_id, Policy.model == ctx.job.model)
            .order_by(Policy.created_at.desc())
            .limit(1)
        )


def policy_uri_allowed(uri: str, settings: Settings) -> bool:
    """The API's rule (app/modelrefs.py), checked again for rows registered before it existed."""
    from app.errors import ApiError
    from app.modelrefs import check_policy_uri

    try:
        check_policy_uri(uri, settings)
    except ApiError:
        return False
    return True


def trained_policy(ctx: JobContext) -> tuple[Any, str]:
    """A trained HiPP policy for this model, and how it was found (or why there is none): the tenant's
    registered policy (its ``uri`` is a policy directory, id or model fingerprint) first, then the engine's
    store (shipped and user policies) by the model's fingerprint."""
    try:
        from worker.hipp.policy.store import find_policy, policy_for_model
    except ImportError:
        return None, "the engine has no policy store"
    from worker.hipp.errors import HippError

    row = registered_policy(ctx)
    if row is not None and row.uri and not policy_uri_allowed(row.uri, ctx.settings):
        log.warning("job %s: registered policy %s has a uri outside HIPP_POLICY_DIRS: %s", ctx.job.id, row.id, row.uri)
        ctx.run.event(f"registered policy {row.id} cannot be used (its uri is not allowed)", level="warning")
        row = None
    if row is not None and row.uri:
        try:
            return find_policy(row.uri), f"registered policy {row.id} ({row.name})"
        except HippError as exc:
            # The reason can name server paths: it goes to the worker's log, the tenant gets the fact.
            log.warning("job %s: registered policy %s (%s) cannot be used: %s", ctx.job.id, row.id, row.uri, exc)
            ctx.run.event(f"registered policy {row.id} cannot be used (no policy at its uri)", level="warning")
    stored = policy_for_model(ctx.loaded.adapter)
    if stored is not None:
        return stored, f"stored policy {stored.id} trained for this model"
    return None, "no trained policy for this model"


def plans_from_policy(ctx: JobContext, stored: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The policy's mean plan and samples for the job's preference, scored on the world's search split;
    the best non-dominated one (by the preference-weighted return) is chosen."""
    from worker.hipp.policy.search import pareto_front, prepare_search, sample_plans, testbed_search_set
    from worker.hipp.preference import Preference

    n = int(ctx.job.options.get("evaluation", {}).get("max_samples", 16))
    evalset = testbed_search_set(ctx.work_dir / "search", limit=n)
    s_max = float(getattr(stored.policy.config, "s_max", 0.6))
    samples = calibration_samples(ctx, calibration_option(ctx, "samples", CALIBRATION_SAMPLES))
    setup = prepare_search(ctx.loaded, evalset, samples, s_max=s_max, reporter=ctx.run)
    preference = Preference.from_mapping(ctx.job.preference).as_list()
    candidates = sample_plans(
        setup, stored, preference, samples=POLICY_SAMPLES, target=ctx.job.target_sparsity, reporter=ctx.run
    )
    front = pareto_front(candidates) or candidates
    best = max(front, key=lambda c: c.value)
    plans = []
    for c in front:
        summary = c.summary()
        metrics = summary.pop("metrics", {})
        plans.append({"chosen": c is best, "source": "policy", "plan": summary, "metrics": metrics})
    return best.plan, plans


def baseline_plan(ctx: JobContext) -> Any:
    from worker.hipp.pruning.layer_counts import max_sparsity
    from worker.hipp.pruning.plan import geometry_of
    from worker.hipp.pruning.planner import build_plan

    ceiling = max_sparsity(geometry_of(ctx.loaded.adapter))
    if ctx.job.target_sparsity is not None:
        sparsity, mode = ctx.job.target_sparsity, "matched (target_sparsity)"
    else:
        sparsity, mode = baseline_sparsity(ctx.job.preference, ceiling), "from preference (compression weight)"
    ctx.run.event(f"target sparsity {sparsity:.3f} {mode}", data={"sparsity": sparsity, "ceiling": ceiling})
    return build_plan(
        ctx.loaded,
        sparsity,
        criterion="wanda-sp",
        allocation="uniform",
        samples=calibration_samples(ctx, calibration_option(ctx, "samples", CALIBRATION_SAMPLES)),
        reporter=ctx.run,
    )


def stage_plan(ctx: JobContext) -> dict[str, Any]:
    """A trained policy's plan when one exists for the model, else the baseline allocator's (uniform
    allocation, Wanda-sp importance). The plan is saved to object storage; a retry reuses it."""
    from worker.hipp.pruning.plan import PruningPlan

    key = f"jobs/{ctx.job.id}/stages/plan.json"
    saved = (ctx.job.stage_outputs or {}).get("plan")
    plans: list[dict[str, Any]] = []
    if saved and ctx.storage.exists(saved):
        ctx.plan = PruningPlan.from_json(ctx.storage.get_bytes(saved).decode())
        source, detail = ctx.plan.meta.get("source", "baseline"), ctx.plan.meta.get("source_detail", "")
        considered = (ctx.job.stage_outputs or {}).get("plans")
        if considered and ctx.storage.exists(considered):
            plans = json.loads(ctx.storage.get_bytes(considered))
        ctx.run.event("reused the plan saved by a previous attempt", data={"key": saved})
    else:
        stored, found = trained_policy(ctx)
        if stored is not None:
            ctx.run.event(f"planning with {found}")
            ctx.plan, plans = plans_from_policy(ctx, stored)
            source, detail = "policy", found
        else:
            ctx.plan = baseline_plan(ctx)
            source, detail = "baseline", f"{found}; baseline allocator (uniform, wanda-sp)"
        ctx.plan.meta.update(source=source, source_detail=detail, preference=ctx.job.preference, job_id=str(ctx.job.id))
        ctx.storage.put_bytes(key, ctx.plan.to_json().encode(), "application/json")
        ctx.run.save_stage_output("plan", key)
        if plans:
            plans_key = f"jobs/{ctx.job.id}/stages/plans.json"
            ctx.storage.put_bytes(plans_key, json.dumps(plans).encode(), "application/json")
            ctx.run.save_stage_output("plans", plans_key)

    summary = ctx.plan.summary()
    summary.pop("layers", None)
    chosen = {"fingerprint": ctx.plan.fingerprint, **summary, "meta": ctx.plan.meta}
    ctx.result["plan_source"] = source
    ctx.result["plan_source_detail"] = detail
    ctx.result["chosen_plan"] = chosen
    ctx.result["plans"] = plans or [{"chosen": True, "source": source, "plan": chosen, "metrics": {}}]
    return {"fingerprint": ctx.plan.fingerprint, "sparsity": summary["sparsity"], "source": source}


def stage_prune(ctx: JobContext) -> dict[str, Any]:
    from worker.hipp.pruning.surgery import apply_plan

    ctx.run.check()
    apply_plan(ctx.loaded.adapter, ctx.plan)
    params = sum(p.numel() for p in ctx.loaded.model.parameters())
    ctx.result["pruned"] = {"parameters": params}
    ctx.new_outputs["weights"] = save_weights(ctx, "prune")
    return {"parameters": params, "removed": ctx.result["dense"]["parameters"] - params}


def save_weights(ctx: JobContext, stage: str) -> dict[str, Any]:
    """The model's weights after ``stage``, as safetensors in object storage (key, size, SHA-256)."""
    from safetensors.torch import save_model

    path = ctx.work_dir / f"{stage}.safetensors"
    save_model(ctx.loaded.model, str(path))
    obj = ctx.storage.put_file(f"jobs/{ctx.job.id}/stages/{stage}.safetensors", path, "application/octet-stream")
    path.unlink(missing_ok=True)
    return {"key": obj.key, "sha256": obj.sha256, "size": obj.size, "stage": stage}


def restore_weights(ctx: JobContext) -> None:
    """Re-apply the saved plan to the freshly loaded model and load the latest saved weights into it. The
    download is checked against the recorded SHA-256: a corrupted stage output fails the attempt loudly."""
    from safetensors.torch import load_model

    from worker.hipp.pruning.surgery import apply_plan

    apply_plan(ctx.loaded.adapter, ctx.plan)
    saved = ctx.run.outputs.get("weights")
    if not saved:
        return
    path = ctx.work_dir / "restore.safetensors"
    ctx.storage.download(saved["key"], path, sha256=saved["sha256"])
    load_model(ctx.loaded.model, str(path), device=str(ctx.loaded.device))
    path.unlink(missing_ok=True)
    ctx.run.event(f"restored the weights saved after {saved['stage']}", data={"key": saved["key"]})


def stage_recover(ctx: JobContext) -> dict[str, Any]:
    """LoRA (or distillation) recovery on world conversations, merged back into the pruned model."""
    options = ctx.job.options.get("recovery", {})
    steps = int(options.get("steps", 0))
    if steps <= 0:
        raise Skipped("no recovery requested (recovery.steps = 0)")
    from worker.hipp.recovery.conversations import world_conversations
    from worker.hipp.recovery.training import RecoveryConfig, recover

    config = RecoveryConfig(
        method=options.get("method", "lora"),
        steps=steps,
        max_seconds=options.get("max_seconds"),
        learning_rate=options.get("learning_rate"),
        batch_size=int(options.get("batch_size", 4)),
    )
    count = min(steps * config.batch_size, 512)  # seen about once each in short runs, cycled in long ones
    teacher = load(ctx) if config.needs_teacher else None
    outcome = recover(ctx.loaded, world_conversations(count, seed=0), config, teacher=teacher, reporter=ctx.run)
    ctx.result["recovery"] = outcome.record(
        config, teacher=ctx.job.model if teacher else None, data=f"world training split ({count} conversations)"
    )
    ctx.run.check()  # a cancel that stopped the training early must not record recovered weights
    ctx.new_outputs["weights"] = save_weights(ctx, "recover")
    return {"steps": outcome.steps, "loss_last": ctx.result["recovery"]["loss_last"]}


def stage_evaluate(ctx: JobContext) -> dict[str, Any]:
    from worker.hipp.evaluation.latency import prompt_latency
    from worker.hipp.models.decoding import device_name, latency_report

    dense, pruned = ctx.result["dense"]["parameters"], ctx.result["pruned"]["parameters"]
    ctx.result["metrics"] = {
        "parameters": pruned,
        "dense_parameters": dense,
        "parameter_reduction": round(1 - pruned / dense, 6),
        "decoder_sparsity": ctx.result["chosen_plan"]["sparsity"],
        "flops_per_token": ctx.result["chosen_plan"]["flops_per_token"],
        "dense_flops_per_token": ctx.result["chosen_plan"]["dense_flops_per_token"],
    }
    if "latency" in ctx.result["dense"]:  # absent only in a job resumed from a version that did not time it
        plan = ctx.result["chosen_plan"]
        ctx.result["metrics"]["latency"] = latency_report(
            ctx.result["dense"]["latency"], prompt_latency(ctx.loaded),
            ideal_speedup=plan["dense_flops_per_token"] / plan["flops_per_token"],
            device=device_name(ctx.loaded.device),
        )
    if not evaluation_enabled(ctx):
        raise Skipped("evaluation disabled by the request; recorded parameter and FLOP counts only")
    ctx.result["metrics"]["evaluation"] = evaluate_model(ctx, ctx.loaded.model)
    if ctx.result["plan_source"] == "baseline":
        ctx.result["plans"][0]["metrics"] = ctx.result["metrics"]["evaluation"]
    return {"evaluation": ctx.result["metrics"]["evaluation"]}


def export_options(ctx: JobContext) -> dict[str, Any]:
    """The job's export dtype (None: the source checkpoint's) and shard size."""
    from worker.hipp.models.loading import resolve_dtype

    options = ctx.job.options.get("export") or {}
    dtype = options.get("dtype", "auto")
    return {"dtype": None if dtype == "auto" else resolve_dtype(dtype),
            "max_shard_size": int(float(options.get("max_shard_size_mb", 5000)) * 1_000_000)}


def stage_upload(ctx: JobContext) -> dict[str, Any]:
    from worker.hipp.checkpoint.export import export_loaded
    from worker.hipp.models.loading import dtype_name

    out = ctx.work_dir / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    card = {"source_model": ctx.job.model, "preference": ctx.job.preference, "job_id": str(ctx.job.id)}
    metrics = {**ctx.result.get("metrics", {}), "dense": ctx.result.get("dense", {})}
    if "recovery" in ctx.result:
        metrics["recovery"] = ctx.result["recovery"]
    export_loaded(ctx.loaded, out, plan=ctx.plan, metrics=metrics, card=card, **export_options(ctx))
    ctx.run.check()
    archive = ctx.work_dir / "checkpoint.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(out, arcname="checkpoint")
    uploads = [("checkpoint", "checkpoint.tar", archive, "application/x-tar")]
    for name in ("hipp_plan.json", "metrics.json"):
        if (out / name).is_file():
            uploads.append((name.split(".")[0], name, out / name, "application/json"))
    rows = []
    for kind, name, path, ctype in uploads:
        obj = ctx.storage.put_file(f"jobs/{ctx.job.id}/{name}", path, ctype)
        rows.append(
            Artifact(
                job_id=ctx.job.id,
                kind=kind,
                name=name,
                key=obj.key,
                size=obj.size,
                sha256=obj.sha256,
                content_type=ctype,
            )
        )
    ctx.rows = rows  # written with the stage's completion, in one transaction (JobRun.end)
    ctx.result["checkpoint"] = {"artifact": "checkpoint.tar", "sha256": rows[0].sha256, "size": rows[0].size,
                                "dtype": dtype_name(ctx.loaded.dtype),
                                "weight_files": sorted(p.name for p in out.glob("*.safetensors"))}
    return {"artifacts": [r.name for r in rows], "bytes": sum(r.size for r in rows)}


STAGE_FUNCS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "load": stage_load,
    "sensitivity": stage_sensitivity,
    "plan": stage_plan,
    "prune": stage_prune,
    "recover": stage_recover,
    "evaluate": stage_evaluate,
    "upload": stage_upload,
}
assert tuple(STAGE_FUNCS) == STAGES


def restore_load(ctx: JobContext) -> None:
    ctx.loaded = load(ctx)  # the dense metrics of the first attempt are in the saved result


def restore_plan(ctx: JobContext) -> None:
    stage_plan(ctx)  # reads the saved plan back


# What a retry redoes for a stage an earlier attempt finished (in-memory state only; nothing recomputed).
RESTORE: dict[str, Callable[[JobContext], None]] = {
    "load": restore_load,
    "plan": restore_plan,
    "prune": restore_weights,
}


def mid_stage_fault(settings: Settings, job: Job) -> str | None:
    """Fault injection for tests: ``{"fault": {"crash_in": STAGE, "attempts": [1]}}`` SIGKILLs the worker at
    the first unit of progress inside STAGE, on the listed attempts (default: the first) - a kill -9 at a
    known point in the middle of a stage, whatever the machine's speed."""
    if not settings.fault_injection:
        return None
    fault = (job.meta or {}).get("fault")
    if not isinstance(fault, dict) or not fault.get("crash_in"):
        return None
    return str(fault["crash_in"]) if job.attempt in fault.get("attempts", [1]) else None


def maybe_crash(ctx: JobContext, stage: str) -> None:
    """Fault injection for tests (``HIPP_FAULT_INJECTION``): SIGKILL this process when ``stage`` starts."""
    if not ctx.settings.fault_injection:
        return
    fault = (ctx.job.meta or {}).get("fault")
    if isinstance(fault, dict) and fault.get("crash_at") == stage:
        ctx.run.event(f"fault injection: killing worker process {os.getpid()} at {stage}", level="warning")
        os.kill(os.getpid(), signal.SIGKILL)


# --- the runner ---------------------------------------------------------------------------------------
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
    remaining = [s for s in STAGES if s not in completed]
    run.start_heartbeat()
    started = time.perf_counter()
    try:
        if completed:
            run.event(
                f"resuming at {remaining[0] if remaining else 'the end'}: reusing {', '.join(completed)}",
                data={"completed": completed},
            )
        for stage in STAGES:
            run.check()
            if stage in completed:
                if remaining:
                    run.reused(stage, ctx.result["stages"].get(stage, {}).get("attempt"))
                    if stage in RESTORE:
                        RESTORE[stage](ctx)
                continue
            maybe_crash(ctx, stage)
            run.begin(stage)
            t0 = time.perf_counter()
            ctx.new_outputs, ctx.rows = {}, []
            try:
                data = STAGE_FUNCS[stage](ctx)
                seconds = time.perf_counter() - t0
                ctx.result["stages"][stage] = {"status": "done", "seconds": round(seconds, 3), "attempt": run.attempt}
                run.end(stage, seconds, data=data, result=ctx.result, outputs=ctx.new_outputs, rows=ctx.rows)
            except Skipped as skip:
                ctx.result["stages"][stage] = {"status": "skipped", "reason": str(skip), "attempt": run.attempt}
                run.end(stage, time.perf_counter() - t0, skipped=str(skip), result=ctx.result)
        run.check()
        ctx.result["seconds"] = round(time.perf_counter() - started, 3)
        return _finish(run, JobStatus.succeeded, result=ctx.result, progress=1.0, stage=None)
    except LeaseLost as exc:
        log.warning("%s", exc)
        return "lease-lost"
    except Cancelled:
        run.stage_name = None
        run.event("cancelled at the caller's request")
        return _finish(run, JobStatus.cancelled, result=ctx.result or None)
    except Exception as exc:
        return _fail(run, job, exc, settings)
    finally:
        run.stop_heartbeat()
        shutil.rmtree(work_dir, ignore_errors=True)


def _finish(run: JobRun, status: JobStatus, **values: Any) -> str:
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
        s.commit()
    if not res.rowcount:  # type: ignore[attr-defined]
        return "lease-lost"
    run.stage_name = None
    run.event(f"job {status.value}")
    from app.retention import delete_stage_outputs

    delete_stage_outputs(get_storage(run.settings), run.factory, run.job_id)  # no retry will resume it
    return status.value


_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/:,;()\[\]]+/?)+")


def redact_paths(message: str, model: str) -> str:
    """Server paths out of a message a tenant reads (job error, events); the model reference the tenant
    named itself (a folder under ``HIPP_MODEL_DIRS``) stays."""
    def keep(path: str) -> bool:
        return model.startswith("/") and (path.rstrip("/") == model or path.startswith(model.rstrip("/") + "/"))

    return _ABS_PATH.sub(lambda m: m.group(0) if keep(m.group(0)) else "<server path>", message)


def _fail(run: JobRun, job: Job, exc: Exception, settings: Settings) -> str:
    from worker.hipp.errors import HippError

    if run.cancel_requested():
        # Cancelled while this attempt was failing (e.g. during load): the caller's cancel wins.
        log.warning("job %s: attempt %s failed after a cancel request", run.job_id, job.attempt, exc_info=exc)
        run.stage_name = None
        run.event("cancelled at the caller's request")
        return _finish(run, JobStatus.cancelled)
    code = getattr(exc, "code", "internal_error")
    message = redact_paths(str(exc) or type(exc).__name__, job.model)
    if isinstance(exc, HippError):
        run.event(f"failed: {message}", level="error", data={"code": code})
        return _finish(run, JobStatus.failed, error={"code": code, "message": message, "retryable": False})
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
    return _finish(
        run,
        JobStatus.failed,
        error={
            "code": "internal_error",
            "message": f"{type(exc).__name__}: {message} (after {job.attempt} attempts)",
            "retryable": True,
        },
    )
