"""What the stages keep in object storage, under ``jobs/<id>/``: the stage outputs a retry resumes from
(``stages/``: sensitivity, the plan and the plans considered, the weights after prune and after recover, each
with its SHA-256) and the checkpoint's artifacts. A retry reloads the model, restores the plan and the latest
weights (checked against their SHA-256) and restarts at the first unfinished stage."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model

from app.models import Artifact
from worker.hipp.pruning.plan import PruningPlan
from worker.pipeline.context import JobContext


def _key(ctx: JobContext, name: str) -> str:
    return f"jobs/{ctx.job.id}/{name}"


def save_json(ctx: JobContext, stage: str, data: Any) -> None:
    """``data`` as ``stages/<stage>.json``, recorded as the stage output ``stage``."""
    key = _key(ctx, f"stages/{stage}.json")
    ctx.storage.put_bytes(key, json.dumps(data).encode(), "application/json")
    ctx.run.save_stage_output(stage, key)


def save_plan(ctx: JobContext, considered: list[dict[str, Any]]) -> None:
    """The chosen plan and (when there are any) the plans considered, as stage outputs."""
    key = _key(ctx, "stages/plan.json")
    ctx.storage.put_bytes(key, ctx.plan.to_json().encode(), "application/json")
    ctx.run.save_stage_output("plan", key)
    if considered:
        save_json(ctx, "plans", considered)


def saved_plan(ctx: JobContext) -> tuple[PruningPlan, list[dict[str, Any]]] | None:
    """The plan (and the plans considered) saved by an earlier attempt, if any."""
    outputs = ctx.job.stage_outputs or {}
    saved = outputs.get("plan")
    if not saved or not ctx.storage.exists(saved):
        return None
    plan = PruningPlan.from_json(ctx.storage.get_bytes(saved).decode())
    considered = outputs.get("plans")
    plans = json.loads(ctx.storage.get_bytes(considered)) if considered and ctx.storage.exists(considered) else []
    ctx.run.event("reused the plan saved by a previous attempt", data={"key": saved})
    return plan, plans


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


def upload_checkpoint(ctx: JobContext, folder: Path) -> list[Artifact]:
    """The exported ``folder`` as ``checkpoint.tar``, plus its plan and metrics files; their artifact rows are
    written with the stage's completion, in one transaction (``JobRun.end``)."""
    archive = ctx.work_dir / "checkpoint.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="checkpoint")
    uploads = [("checkpoint", "checkpoint.tar", archive, "application/x-tar")]
    for name in ("hipp_plan.json", "metrics.json"):
        if (folder / name).is_file():
            uploads.append((name.split(".")[0], name, folder / name, "application/json"))
    rows = []
    for kind, name, path, ctype in uploads:
        obj = ctx.storage.put_file(_key(ctx, name), path, ctype)
        rows.append(Artifact(job_id=ctx.job.id, kind=kind, name=name, key=obj.key, size=obj.size,
                             sha256=obj.sha256, content_type=ctype))
    return rows
