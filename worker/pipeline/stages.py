"""The stages: load -> sensitivity -> plan -> prune -> recover -> evaluate -> upload. Each calls the engine
entry point that makes its decision (mostly ``worker.hipp.job``), saves its outputs (``outputs``) and writes
its part of the result; none re-implements the engine. A stage whose engine part is not wanted raises
``Skipped`` with the reason; results are never faked. The tenant's data sets the job names (``data``) are
fetched by ``worker.pipeline.data`` and used in place of the engine's synthetic data; every metrics dict names
the data it was measured on."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.config import Settings
from app.errors import ApiError
from app.modelrefs import check_policy_uri
from app.models import STAGES, Policy, PolicyStatus
from worker import evaluation_queue
from worker.hipp import job as engine
from worker.hipp.calibration_source import choose_calibration, samples_from_images
from worker.hipp.checkpoint.export import export_loaded
from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.errors import HippError
from worker.hipp.evaluation.plan_evaluator import EvalSet
from worker.hipp.models import builtin
from worker.hipp.models.export_options import AUTO
from worker.hipp.models.loading import LoadedModel, dtype_name, load_model
from worker.hipp.policy.store import StoredPolicy, find_policy
from worker.hipp.pruning.surgery import apply_plan
from worker.hipp.recovery.conversations import Conversation, load_llava_json
from worker.hipp.recovery.training import RecoveryConfig
from worker.hipp.sensitivity import compute_visual_sensitivity
from worker.pipeline import data, outputs
from worker.pipeline.context import JobContext
from worker.pipeline.run import Skipped

log = logging.getLogger("hipp.pipeline")

CALIBRATION_SAMPLES = 16  # the API's default for calibration.samples


# --- engine calls with the service's rules and the request's options ------------------------------------------
def load(ctx: JobContext) -> LoadedModel:
    """The job's model, on the worker's device, in the worker's dtype."""
    with hub_ids_from_the_hub(ctx.job.model):
        return load_model(ctx.job.model, dtype=ctx.settings.dtype, device=engine.resolve_device(ctx.settings.device))


@contextmanager
def hub_ids_from_the_hub(ref: str) -> Iterator[None]:
    """A reference that is neither a built-in name nor an absolute path (the API only lets folders under
    ``HIPP_MODEL_DIRS`` through, as absolute paths) is a hub id: it is loaded in an empty directory, so an
    ``org/name`` that happens to be a folder relative to the worker's directory is never read."""
    if ref in builtin.BUILTINS or builtin.is_testbed(ref) or Path(ref).is_absolute():
        yield
        return
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="hipp-hub-") as empty:
        os.chdir(empty)
        try:
            yield
        finally:
            os.chdir(old)


def calibration(ctx: JobContext, name: str, default: int) -> list[CalibrationSample]:
    """``calibration.<name>`` images: the tenant's (``data.calibration``) when named, else the engine's choice
    for the job's model, with a warning in the result when they are not from the model's own distribution."""
    count = int(ctx.option("calibration", name, default))
    ref = data.named(ctx, "calibration")
    if ref is not None:
        choice = samples_from_images(data.image_files(data.dataset_dir(ctx, ref)), count)
        ctx.result["calibration"] = {"source": choice.source, "data": data.label_of(ref), "warning": None}
    else:
        choice = choose_calibration(ctx.job.model, count)
        ctx.result["calibration"] = {"source": choice.source, "warning": choice.warning}
    return choice.samples


def evaluation_skipped(ctx: JobContext) -> str | None:
    """Why the dense and the pruned model are not evaluated (None: they are)."""
    if not ctx.evaluation_enabled:
        return "evaluation disabled by the request; recorded parameter and FLOP counts only"
    if data.named(ctx, "evaluation") is None and not data.world_evaluation_allowed(ctx):
        return data.no_evaluation_data_reason(ctx)
    return None


def evaluate_model(ctx: JobContext, loaded: LoadedModel) -> dict[str, Any]:
    """POPE / ScienceQA metrics of ``loaded`` on the tenant's benchmark data sets (``data.evaluation``) or the
    synthetic world, with ``data`` naming which (each data set's id and SHA-256)."""
    files = data.benchmarks(ctx, "evaluation", "test")
    if files is None:
        metrics = engine.evaluate_on_world(loaded, ctx.work_dir / "benchmarks", ctx.evaluation_limit, ctx.run)
        metrics["data"] = data.WORLD_LABEL
    else:
        metrics = engine.evaluate_on_files(loaded, files.pope_dir, files.sqa_dir, ctx.evaluation_limit,
                                           files.sqa_split, ctx.run)
        metrics["data"] = files.label
    return metrics


def search_set(ctx: JobContext) -> tuple[EvalSet | None, Any]:
    """The plan search's evaluation set from ``data.search`` (None: the engine's world search split) and its
    label."""
    files = data.benchmarks(ctx, "search", "val")
    if files is None:
        return None, "synthetic world search split"
    evalset = EvalSet.from_dirs(files.pope_dir, files.sqa_dir, files.sqa_split, limit=ctx.evaluation_limit)
    return evalset, files.label


def search_spec(ctx: JobContext, limit: int | None = None) -> dict[str, Any]:
    """How the search set is built (``data.search``, else the world's search split; ``limit`` questions per
    split, default the job's evaluation limit): what an evaluation worker rebuilds it from."""
    limit = ctx.evaluation_limit if limit is None else limit
    files = data.benchmarks(ctx, "search", "val")  # fetched by search_set already: found in the work folder
    if files is None:
        return evaluation_queue.world_search_spec(limit)
    return evaluation_queue.dataset_search_spec(data.named(ctx, "search") or {}, files.sqa_split, limit)


def search_evaluations(ctx: JobContext) -> engine.EvaluationsFor | None:
    """Where the plan search scores its plans: None (in this process) unless ``HIPP_EVALUATION_MODE=queue``."""
    if ctx.settings.evaluation_mode == "inprocess":
        return None
    spec = search_spec(ctx)
    return lambda setup: evaluation_queue.batch_evaluator_for(ctx.settings, setup, spec)


def recovery_conversations(ctx: JobContext, ref: dict[str, Any]) -> list[Conversation]:
    files = data.conversation_files(data.dataset_dir(ctx, ref))
    conversations = [c for path in files for c in load_llava_json(path)]
    if not conversations:
        raise data.DataError(f"data set {ref['id']} holds no conversations to recover on")
    return conversations


def recovery_config(ctx: JobContext) -> RecoveryConfig | None:
    """None when no recovery was requested (``recovery.steps`` = 0)."""
    steps = int(ctx.option("recovery", "steps", 0))
    if steps <= 0:
        return None
    return RecoveryConfig(method=ctx.option("recovery", "method", "lora"), steps=steps,
                          max_seconds=ctx.option("recovery", "max_seconds", None),
                          learning_rate=ctx.option("recovery", "learning_rate", None),
                          batch_size=int(ctx.option("recovery", "batch_size", 4)))


def export_options(ctx: JobContext) -> dict[str, Any]:
    """``export_loaded``'s dtype (None: the source checkpoint's) and shard size (``max_shard_size_mb``)."""
    return {"dtype": engine.export_dtype(ctx.option("export", "dtype", AUTO)),
            "max_shard_size": int(float(ctx.option("export", "max_shard_size_mb", 5000)) * 1_000_000)}


# --- the stages -------------------------------------------------------------------------------------------------
def stage_load(ctx: JobContext) -> dict[str, Any]:
    ctx.loaded = load(ctx)
    ctx.result["device"] = str(ctx.loaded.device)
    skipped = evaluation_skipped(ctx)
    if skipped is None:
        ctx.run.event("evaluating the dense model (baseline for the metrics)")
    elif ctx.evaluation_enabled:
        ctx.run.event(skipped, level="warning")
    evaluation = None if skipped else (lambda loaded: evaluate_model(ctx, loaded))
    ctx.result["dense"] = engine.measure(ctx.loaded, evaluation)
    return {"parameters": ctx.result["dense"]["parameters"], "adapter": type(ctx.loaded.adapter).__name__,
            "device": ctx.result["device"]}


def stage_sensitivity(ctx: JobContext) -> dict[str, Any]:
    """Visual sensitivity per decoder layer (attention flow), saved with the job's stage outputs. The
    baseline allocator does not consume it; a policy computes its own; a replayed plan needs no search."""
    ref = ctx.plan_reference
    if ref is not None:
        raise Skipped(f"plan {ref['index']} of job {ref['job']} is replayed: no plan search to inform")
    samples = calibration(ctx, "sensitivity_samples", 8)
    result = compute_visual_sensitivity(ctx.loaded, samples, batch_size=4, reporter=ctx.run)
    outputs.save_json(ctx, "sensitivity", result.to_dict())
    ctx.result["sensitivity"] = {"direct": result.direct, "increment": result.increment, "samples": result.samples}
    return {"layers": result.num_layers, "samples": result.samples}


def policy_uri_allowed(uri: str, settings: Settings) -> bool:
    """The API's rule (app/modelrefs.py), checked again for rows registered before it existed."""
    try:
        check_policy_uri(uri, settings)
    except ApiError:
        return False
    return True


def trained_policy(ctx: JobContext) -> tuple[StoredPolicy | None, str]:
    """A trained HiPP policy for this model, and how it was found (or why there is none): the tenant's newest
    ready policy for this model reference (one the service trained, ``store:policies/<id>``, or one registered
    by POST /policies: its ``uri`` is a policy directory, id or model fingerprint) first, then the engine's
    store by the model's fingerprint."""
    with ctx.run.factory() as s:
        row = s.scalar(select(Policy).where(Policy.tenant_id == ctx.job.tenant_id, Policy.model == ctx.job.model,
                                            Policy.status == PolicyStatus.ready.value)
                       .order_by(Policy.created_at.desc()).limit(1))
    if row is not None and row.uri and row.uri.startswith(outputs.STORE_SCHEME):  # set by a training job only
        try:
            return outputs.stored_policy(ctx, row.uri), f"trained policy {row.id} ({row.name})"
        except HippError as exc:
            log.warning("job %s: trained policy %s (%s) cannot be used: %s", ctx.job.id, row.id, row.uri, exc)
            ctx.run.event(f"trained policy {row.id} cannot be used (its files are gone)", level="warning")
            return engine.stored_policy(ctx.loaded)
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
    return engine.stored_policy(ctx.loaded)


def choose_plan(ctx: JobContext) -> engine.PlanChoice:
    """The plan an earlier job considered when the request names one (``plan: {job, index}``), else the
    engine's plan for the job's preference (a trained policy's, else the baseline allocator's)."""
    ref = ctx.plan_reference
    if ref is not None:
        detail = f"plan {ref['index']} of job {ref['job']}"
        choice = engine.replay_plan(ctx.loaded, outputs.kept_plan(ctx, ref["job"], int(ref["index"])), detail,
                                    fingerprint=ref.get("fingerprint", ""))
        ctx.run.event(f"replayed {detail} (no search)", data=dict(ref))
        return choice
    policy, found = trained_policy(ctx)
    evalset, label = search_set(ctx) if policy is not None else (None, None)
    choice = engine.choose_plan(
        ctx.loaded, ctx.preference, ctx.job.target_sparsity, calibration(ctx, "samples", CALIBRATION_SAMPLES),
        policy, found, search_dir=ctx.work_dir / "search", limit=ctx.evaluation_limit, reporter=ctx.run,
        search_set=evalset, evaluations=search_evaluations(ctx) if policy is not None else None)
    for considered in choice.considered:  # the search's metrics name the data they were measured on
        considered["metrics"] = {**considered.get("metrics", {}), "data": label}
    return choice


def stage_plan(ctx: JobContext) -> dict[str, Any]:
    """The job's plan (:func:`choose_plan`), saved with the stage outputs; a retry reads it back instead."""
    saved = outputs.saved_plan(ctx)
    if saved is not None:
        ctx.plan, plans, ctx.considered_plans = saved
    else:
        choice = choose_plan(ctx)
        ctx.plan, plans, ctx.considered_plans = choice.plan, choice.considered, choice.plans
        ctx.plan.meta.update(preference=ctx.job.preference, job_id=str(ctx.job.id))
        outputs.save_plan(ctx, plans)
    source = ctx.plan.meta.get("source", "baseline")
    summary = ctx.plan.summary()
    summary.pop("layers", None)
    chosen = {"fingerprint": ctx.plan.fingerprint, **summary, "meta": ctx.plan.meta}
    ctx.result.update(plan_source=source, plan_source_detail=ctx.plan.meta.get("source_detail", ""),
                      chosen_plan=chosen)
    if ctx.plan_reference is not None:
        ctx.result["replayed_from"] = {**ctx.plan_reference, "fingerprint": ctx.plan.fingerprint}
    ctx.result["plans"] = plans or [{"chosen": True, "source": source, "plan": chosen, "metrics": {}}]
    return {"fingerprint": ctx.plan.fingerprint, "sparsity": summary["sparsity"], "source": source}


def stage_prune(ctx: JobContext) -> dict[str, Any]:
    ctx.run.check()
    apply_plan(ctx.loaded.adapter, ctx.plan)
    params = engine.parameter_count(ctx.loaded)
    ctx.result["pruned"] = {"parameters": params}
    ctx.new_outputs["weights"] = outputs.save_weights(ctx, "prune")
    return {"parameters": params, "removed": ctx.result["dense"]["parameters"] - params}


def stage_recover(ctx: JobContext) -> dict[str, Any]:
    """LoRA (or distillation from the dense model) recovery, merged back into the pruned model."""
    config = recovery_config(ctx)
    if config is None:
        raise Skipped("no recovery requested (recovery.steps = 0)")
    ref = data.named(ctx, "recovery")
    if ref is None and not builtin.is_testbed(ctx.job.model):  # the API refuses it; a job queued before it did not
        raise data.DataError(f"{ctx.job.model!r} is not the testbed: recovery needs a conversations data set; "
                             "upload one and name it in data.recovery")
    conversations = recovery_conversations(ctx, ref) if ref is not None else None  # fetched before the teacher
    teacher = load(ctx) if config.needs_teacher else None
    if ref is None or conversations is None:
        outcome, ctx.result["recovery"] = engine.recover_on_world(ctx.loaded, config, teacher, ctx.run)
    else:
        outcome, ctx.result["recovery"] = engine.recover_on_conversations(
            ctx.loaded, config, conversations, data.label_of(ref), teacher, ctx.run)
    ctx.run.check()  # a cancel that stopped the training early must not record recovered weights
    ctx.new_outputs["weights"] = outputs.save_weights(ctx, "recover")
    return {"steps": outcome.steps, "loss_last": ctx.result["recovery"]["loss_last"]}


def stage_evaluate(ctx: JobContext) -> dict[str, Any]:
    ctx.result["metrics"] = engine.pruned_metrics(ctx.loaded, ctx.plan, ctx.result["dense"])
    skipped = evaluation_skipped(ctx)
    if skipped is not None:
        raise Skipped(skipped)
    evaluation = evaluate_model(ctx, ctx.loaded)
    ctx.result["metrics"]["evaluation"] = evaluation
    if ctx.result["plan_source"] in ("baseline", "replay"):  # its one plan is the one evaluated
        ctx.result["plans"][0]["metrics"] = evaluation
    return {"evaluation": evaluation}


def stage_upload(ctx: JobContext) -> dict[str, Any]:
    out = ctx.work_dir / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    card = {"source_model": ctx.job.model, "preference": ctx.job.preference, "job_id": str(ctx.job.id)}
    metrics = {**ctx.result.get("metrics", {}), "dense": ctx.result.get("dense", {})}
    if "recovery" in ctx.result:
        metrics["recovery"] = ctx.result["recovery"]
    export_loaded(ctx.loaded, out, plan=ctx.plan, metrics=metrics, card=card, **export_options(ctx))
    plots = engine.plot_plans(ctx.plan, ctx.result["plans"], ctx.work_dir / "plots")
    ctx.run.check()
    ctx.rows = outputs.upload_checkpoint(ctx, out, plots)
    ctx.result["checkpoint"] = {"artifact": "checkpoint.tar", "sha256": ctx.rows[0].sha256,
                                "size": ctx.rows[0].size, "dtype": dtype_name(ctx.loaded.dtype),
                                "weight_files": sorted(p.name for p in out.glob("*.safetensors"))}
    return {"artifacts": [r.name for r in ctx.rows], "bytes": sum(r.size for r in ctx.rows)}


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


def restore_prune(ctx: JobContext) -> None:
    """Re-apply the saved plan to the freshly loaded model, then load the latest saved weights into it."""
    apply_plan(ctx.loaded.adapter, ctx.plan)
    outputs.restore_weights(ctx)


# What a retry redoes for a stage an earlier attempt finished (in-memory state only; nothing recomputed).
RESTORE: dict[str, Callable[[JobContext], None]] = {
    "load": restore_load,
    "plan": restore_plan,
    "prune": restore_prune,
}
