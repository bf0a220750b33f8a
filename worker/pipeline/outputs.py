"""What the stages keep in object storage, under ``jobs/<id>/``: the stage outputs a retry resumes from
(``stages/``: sensitivity, the plan and the plans considered, the weights after prune and after recover, each
with its SHA-256) and the checkpoint's artifacts (the archive, its plan and metrics, every plan considered in
full, and the plots of the plans). A retry reloads the model, restores the plan and the latest weights
(checked against their SHA-256) and restarts at the first unfinished stage.

An earlier job's kept plans (``hipp_plans.json``) are read back here when a job replays one of them, and a policy
the service trained (``store:policies/<id>``, under ``policies/<id>/``) is fetched here for a job that uses it."""

from __future__ import annotations

import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from sqlalchemy import select

from app.models import PLANS_ARTIFACT, Artifact
from worker.hipp.errors import OptionError, PlanError
from worker.hipp.policy.store import META, WEIGHTS, StoredPolicy, load_policy_dir
from worker.hipp.pruning.plan import PruningPlan
from worker.pipeline.context import JobContext

#: A policy the service trained is at ``store:policies/<id>`` (set by the worker only: the API refuses it in
#: POST /policies, so a tenant cannot point a policy at another's files).
STORE_SCHEME = "store:"


def policy_prefix(policy_id: str) -> str:
    return f"policies/{policy_id}/"


def stored_policy(ctx: JobContext, uri: str) -> StoredPolicy:
    """The trained policy at ``uri`` (``store:policies/<id>``), fetched into the job's work folder."""
    prefix = uri.removeprefix(STORE_SCHEME).rstrip("/") + "/"
    folder = ctx.work_dir / "policies" / prefix.strip("/").rsplit("/", 1)[-1]
    for name in (WEIGHTS, META, "state.json"):
        if ctx.storage.exists(prefix + name):
            ctx.storage.download(prefix + name, folder / name)
        elif name != "state.json":
            raise OptionError(f"the trained policy's {name} is gone from storage")
    return load_policy_dir(folder)


def _key(ctx: JobContext, name: str) -> str:
    return f"jobs/{ctx.job.id}/{name}"


def save_json(ctx: JobContext, stage: str, data: Any) -> None:
    """``data`` as ``stages/<stage>.json``, recorded as the stage output ``stage``."""
    key = _key(ctx, f"stages/{stage}.json")
    ctx.storage.put_bytes(key, json.dumps(data).encode(), "application/json")
    ctx.run.save_stage_output(stage, key)


def save_plan(ctx: JobContext, considered: list[dict[str, Any]]) -> None:
    """The chosen plan, (when there are any) the summaries of the plans considered and those plans in full,
    as stage outputs."""
    key = _key(ctx, "stages/plan.json")
    ctx.storage.put_bytes(key, ctx.plan.to_json().encode(), "application/json")
    ctx.run.save_stage_output("plan", key)
    if considered:
        save_json(ctx, "plans", considered)
    save_json(ctx, "plans_full", [p.to_dict() for p in ctx.considered_plans])


def saved_plan(ctx: JobContext) -> tuple[PruningPlan, list[dict[str, Any]], list[PruningPlan]] | None:
    """The plan, the summaries of the plans considered and those plans in full, saved by an earlier attempt,
    if any."""
    outputs = ctx.job.stage_outputs or {}
    saved = outputs.get("plan")
    if not saved or not ctx.storage.exists(saved):
        return None
    plan = PruningPlan.from_json(ctx.storage.get_bytes(saved).decode())
    plans = _stored_json(ctx, outputs.get("plans")) or []
    full = [PruningPlan.from_dict(p) for p in _stored_json(ctx, outputs.get("plans_full")) or []] or [plan]
    ctx.run.event("reused the plan saved by a previous attempt", data={"key": saved})
    return plan, plans, full


def _stored_json(ctx: JobContext, key: str | None) -> Any:
    return json.loads(ctx.storage.get_bytes(key)) if key and ctx.storage.exists(key) else None


def kept_plan(ctx: JobContext, job_id: str, index: int) -> PruningPlan:
    """Plan ``index`` of job ``job_id``'s kept plans (its ``hipp_plans.json`` artifact, checked against the
    SHA-256 recorded with it). A job or artifact deleted since the API checked the reference is an
    ``invalid_plan`` error: the tenant can submit again."""
    with ctx.run.factory() as s:
        row = s.scalar(select(Artifact).where(Artifact.job_id == uuid.UUID(job_id), Artifact.name == PLANS_ARTIFACT))
    if row is None or not ctx.storage.exists(row.key):
        raise PlanError(f"the plans of job {job_id} are gone (the job or its artifacts were deleted since this job "
                        "was submitted); submit it again with a preference instead of plan")
    path = ctx.work_dir / "source_plans.json"
    ctx.storage.download(row.key, path, sha256=row.sha256)
    plans = json.loads(path.read_text())["plans"]
    path.unlink(missing_ok=True)
    if not 0 <= index < len(plans):
        raise PlanError(f"job {job_id} kept {len(plans)} plans; plan index {index} is not one of them")
    return PruningPlan.from_dict(plans[index])


def write_plans_file(ctx: JobContext, path: Path) -> Path:
    """Every plan considered, in full, in the order of ``GET /jobs/{id}/plans``, and which one was chosen."""
    chosen = next((i for i, p in enumerate(ctx.considered_plans) if p.fingerprint == ctx.plan.fingerprint), 0)
    path.write_text(json.dumps({"format": "hipp-plans", "chosen": chosen,
                                "plans": [p.to_dict() for p in ctx.considered_plans]}))
    return path


def save_weights(ctx: JobContext, stage: str) -> dict[str, Any]:
    """The model's weights after ``stage``, as safetensors in object storage (key, size, SHA-256)."""
    path = ctx.work_dir / f"{stage}.safetensors"
    save_model(ctx.loaded.model, str(path))
    obj = ctx.storage.put_file(_key(ctx, f"stages/{stage}.safetensors"), path, "application/octet-stream")
    path.unlink(missing_ok=True)
    return {"key": obj.key, "sha256": obj.sha256, "size": obj.size, "stage": stage}


def restore_weights(ctx: JobContext) -> None:
    """Load the latest saved weights into the (already pruned) model. The download is checked against the
    recorded SHA-256: a corrupted stage output fails the attempt loudly."""
    saved = ctx.run.outputs.get("weights")
    if not saved:
        return
    path = ctx.work_dir / "restore.safetensors"
    ctx.storage.download(saved["key"], path, sha256=saved["sha256"])
    load_model(ctx.loaded.model, str(path), device=str(ctx.loaded.device))
    path.unlink(missing_ok=True)
    ctx.run.event(f"restored the weights saved after {saved['stage']}", data={"key": saved["key"]})


def upload_checkpoint(ctx: JobContext, folder: Path, plots: dict[str, Path]) -> list[Artifact]:
    """The exported ``folder`` as ``checkpoint.tar``, plus its plan and metrics files, every plan considered
    (``hipp_plans.json``) and the ``plots`` (kind -> PNG); their artifact rows are written with the stage's
    completion, in one transaction (``JobRun.end``)."""
    archive = ctx.work_dir / "checkpoint.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="checkpoint")
    uploads = [("checkpoint", "checkpoint.tar", archive, "application/x-tar")]
    for name in ("hipp_plan.json", "metrics.json"):
        if (folder / name).is_file():
            uploads.append((name.split(".")[0], name, folder / name, "application/json"))
    uploads.append(("plans", PLANS_ARTIFACT, write_plans_file(ctx, ctx.work_dir / PLANS_ARTIFACT), "application/json"))
    uploads += [(kind, path.name, path, "image/png") for kind, path in plots.items()]
    rows = []
    for kind, name, path, ctype in uploads:
        obj = ctx.storage.put_file(_key(ctx, name), path, ctype)
        rows.append(Artifact(job_id=ctx.job.id, kind=kind, name=name, key=obj.key, size=obj.size,
                             sha256=obj.sha256, content_type=ctype))
    return rows
