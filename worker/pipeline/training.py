"""The stages of a policy training (a ``train_policy`` job: POST /policies with ``train``): load -> search_setup
-> train -> register. Each is a few lines around one engine entry point (``prepare_search``, ``train_policy``);
the job machinery (claim, lease, heartbeat, events, progress, cancel, retry) is the pruning job's.

Resuming after a crash: the trainer writes its GRPO checkpoint (weights, optimizer moments, RNG states,
history) after every step; at the next ``check()`` the stage's reporter (:class:`CheckpointSync`) uploads it
as a stage output, under ``jobs/<id>/stages/grpo/<step>/``. A later attempt (on any worker) downloads it,
checked against its SHA-256, and ``train_policy`` resumes there: with the same seed, the policy equals that of
an uninterrupted run.

The time budget is checked at the same point, a step boundary: when the steps so far took it, training stops
and the policy as trained so far is registered, the result saying how many steps ran of those asked.

The trained policy's files go to ``policies/<policy id>/`` (not under the job's prefix: deleting the job, or
its artifacts expiring, leaves a registered policy usable); its row gets ``uri`` ``store:policies/<id>`` and
``ready`` when the job succeeds (``runner.finish``)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.models import Artifact
from worker import evaluation_queue
from worker.hipp.evaluation.plan_evaluator import EvalSet
from worker.hipp.models.builtin import is_testbed
from worker.hipp.policy.grpo import GRPOConfig
from worker.hipp.policy.network import PolicyConfig
from worker.hipp.policy.search import prepare_search, testbed_search_set, train_policy
from worker.hipp.policy.store import META, WEIGHTS, StoredPolicy
from worker.hipp.progress import Reporter
from worker.pipeline import data, outputs, stages
from worker.pipeline.context import JobContext

#: What a retry of the train stage resumes from (the stage output's name).
CHECKPOINT_OUTPUT = "grpo_checkpoint"
#: The trained policy's files (uploaded to the policy's prefix, listed as the job's artifacts), by kind.
POLICY_FILES = {"policy_weights": WEIGHTS, "policy": META, "policy_state": "state.json",
                "learning_curve": "learning_curve.png"}
CONTENT_TYPES = {".json": "application/json", ".png": "image/png"}


@dataclass(frozen=True)
class TrainOptions:
    """``options["train"]`` as the API wrote it (every field present, checked there)."""

    steps: int
    group_size: int
    preferences_per_step: int
    budget_min: float
    budget_max: float
    time_budget_s: float | None
    seed: int
    search_limit: int
    calibration_samples: int

    @classmethod
    def of(cls, ctx: JobContext) -> TrainOptions:
        train = ctx.job.options["train"]
        return cls(**{name: train[name] for name in cls.__dataclass_fields__})

    def matched_budgets(self) -> tuple[float, ...]:
        """The matched-mode targets GRPO trains on: four, evenly spread over the budget range."""
        return tuple(round(self.budget_min + (self.budget_max - self.budget_min) * i / 3, 4) for i in range(4))

    def grpo(self, steps: int) -> GRPOConfig:
        """Checkpoints every step: a step is seconds to minutes, and a retry loses at most one."""
        return GRPOConfig(steps=steps, group_size=self.group_size, preferences_per_step=self.preferences_per_step,
                          matched_budgets=self.matched_budgets(), checkpoint_every=1, seed=self.seed)

    def policy(self, num_features: int) -> PolicyConfig:
        return PolicyConfig(num_features=num_features, s_min=self.budget_min, s_max=self.budget_max)


def policy_id(ctx: JobContext) -> str:
    return str(ctx.job.options["policy"]["id"])


# --- the GRPO call, and the reporter that keeps its checkpoints --------------------------------------------------
def grpo(ctx: JobContext, out: Path, options: TrainOptions, steps: int, reporter: Reporter) -> StoredPolicy:
    """Plan-level GRPO for ``steps`` steps into ``out``, resuming from ``out/checkpoint`` when it holds one.
    The one place a training job calls the engine's ``train_policy``."""
    config = options.policy(ctx.search.state.features.shape[1])
    evaluations = evaluation_queue.batch_evaluator_for(ctx.settings, ctx.search,
                                                     stages.search_spec(ctx, options.search_limit))
    return train_policy(ctx.search, out, config, options.grpo(steps), resume=True, reporter=reporter,
                        evaluations=evaluations,
                        extra_meta={"job_id": str(ctx.job.id), "policy_row": policy_id(ctx)})


class BudgetSpent(Exception):
    """The time budget is spent at the boundary after ``step``."""

    def __init__(self, step: int, elapsed: float) -> None:
        super().__init__(f"time budget spent after step {step} ({elapsed:.1f} s of GRPO steps)")
        self.step, self.elapsed = step, elapsed


class CheckpointSync(Reporter):
    """The train stage's reporter: the job's run (events, progress, cancel), and at every ``check()`` after the
    trainer wrote a new checkpoint (``trainer.json`` is written last), its upload and the time budget."""

    def __init__(self, ctx: JobContext, folder: Path, options: TrainOptions, synced: int) -> None:
        self.ctx, self.folder, self.options = ctx, folder, options
        self.synced = synced  # the step of the checkpoint in storage
        self._seen: int | None = None  # trainer.json's mtime when last read

    def stage(self, name: str, message: str = "") -> None:
        self.ctx.run.stage(name, message)

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        self.ctx.run.progress(done, total, message)

    def log(self, message: str) -> None:
        self.ctx.run.log(message)

    def should_stop(self) -> bool:
        return self.ctx.run.should_stop()

    def check(self) -> None:
        self.sync()
        super().check()

    def sync(self) -> None:
        meta_path = self.folder / "trainer.json"
        try:
            mtime = meta_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._seen:
            return
        self._seen = mtime
        meta = json.loads(meta_path.read_text())
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
        if step > self.synced:
            save_checkpoint(self.ctx, self.folder, step)
            self.synced = step
            last = (meta.get("history") or [{}])[-1]
            self.ctx.run.event(f"GRPO step {step} checkpointed (return {last.get('return', float('nan')):.3f})",
                               data={"step": step, "return": last.get("return")})
        budget = self.options.time_budget_s
        if budget is not None and step < self.options.steps and elapsed >= budget:
            raise BudgetSpent(step, elapsed)


def save_checkpoint(ctx: JobContext, folder: Path, step: int) -> None:
    """The checkpoint of ``step`` as one archive in storage, recorded as the stage output only once it is
    there (a crash mid-upload leaves the previous one in force); then the previous one is deleted."""
    archive = ctx.work_dir / f"grpo-{step}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="checkpoint")
    obj = ctx.storage.put_file(f"jobs/{ctx.job.id}/stages/grpo/{step}/checkpoint.tar", archive, "application/x-tar")
    archive.unlink(missing_ok=True)
    previous = ctx.run.outputs.get(CHECKPOINT_OUTPUT)
    ctx.run.save_stage_output(CHECKPOINT_OUTPUT, {"key": obj.key, "sha256": obj.sha256, "step": step})
    if previous:
        ctx.storage.delete_prefix(previous["key"].rsplit("/", 1)[0] + "/")


def restore_checkpoint(ctx: JobContext, folder: Path) -> int:
    """An earlier attempt's checkpoint into ``folder`` (checked against its SHA-256); its step, 0 if none."""
    saved = ctx.run.outputs.get(CHECKPOINT_OUTPUT)
    if not saved:
        return 0
    archive = ctx.work_dir / "grpo-restore.tar"
    ctx.storage.download(saved["key"], archive, sha256=saved["sha256"])
    with tarfile.open(archive) as tar:
        tar.extractall(folder.parent, filter="data")
    archive.unlink(missing_ok=True)
    ctx.run.event(f"restored the GRPO checkpoint of step {saved['step']} saved by an earlier attempt",
                  data={"step": saved["step"]})
    return int(saved["step"])


# --- the stages -------------------------------------------------------------------------------------------------
def search_set(ctx: JobContext, options: TrainOptions) -> tuple[EvalSet, Any]:
    """The tenant's search benchmarks (``data.search``), else the testbed's synthetic search split; and its
    label."""
    files = data.benchmarks(ctx, "search", "val")
    limit = options.search_limit
    if files is not None:
        return EvalSet.from_dirs(files.pope_dir, files.sqa_dir, files.sqa_split, limit=limit), files.label
    if not is_testbed(ctx.job.model):  # the API refuses it; a job queued before it did not
        raise data.DataError(f"{ctx.job.model!r} is not the testbed: name POPE / ScienceQA data sets in "
                             "train.search")
    return testbed_search_set(ctx.work_dir / "search-data", limit=limit), "synthetic world search split"


def stage_load(ctx: JobContext) -> dict[str, Any]:
    ctx.loaded = stages.load(ctx)
    ctx.result["device"] = str(ctx.loaded.device)
    return {"adapter": type(ctx.loaded.adapter).__name__, "device": ctx.result["device"]}


def stage_search_setup(ctx: JobContext) -> dict[str, Any]:
    """The policy state, criterion scores and the search set's evaluator (with the dense model's metrics)."""
    options = TrainOptions.of(ctx)
    evalset, label = search_set(ctx, options)
    samples = stages.calibration(ctx, "samples", options.calibration_samples)
    ctx.search = prepare_search(ctx.loaded, evalset, samples, s_max=options.budget_max, reporter=ctx.run)
    ctx.result["search"] = {"data": label, "questions": evalset.size(), "fingerprint": ctx.search.fingerprint,
                            "dense_metrics": ctx.search.evaluator.dense_metrics}
    return {"questions": evalset.size(), "fingerprint": ctx.search.fingerprint}


def stage_train(ctx: JobContext) -> dict[str, Any]:
    """GRPO from the last saved checkpoint (if any) to ``steps`` or the time budget; the policy's files
    uploaded to its prefix."""
    options = TrainOptions.of(ctx)
    out = ctx.work_dir / "policy"
    start = restore_checkpoint(ctx, out / "checkpoint")
    stopped = None
    try:
        stored = grpo(ctx, out, options, options.steps, CheckpointSync(ctx, out / "checkpoint", options, start))
    except BudgetSpent as spent:
        ctx.run.event(f"{spent}; registering the policy trained so far ({spent.step} of {options.steps} steps)",
                      level="warning", data={"step": spent.step, "elapsed_s": round(spent.elapsed, 3)})
        stopped = "time_budget"
        stored = grpo(ctx, out, options, spent.step, ctx.run)  # resumes at that checkpoint: no step to run
    ctx.run.check()  # a cancel seen at the last step's end must not upload a policy
    history = json.loads((out / "checkpoint" / "trainer.json").read_text())["history"]
    training = stored.meta["training"]
    ctx.result["training"] = {
        "steps": training["steps"], "steps_asked": options.steps, "stopped_by": stopped,
        "resumed_from_step": start or None, "wall_seconds": round(float(training["wall_seconds"]), 3),
        "plan_evaluations": sum(int(h["plans"]) for h in history),
        "final_return": training["final_return"], "fingerprint": stored.meta["model_fingerprint"],
        "learning_curve": [{"step": h["step"], "return": h["return"]} for h in history],
    }
    ctx.new_outputs["policy_files"] = upload_policy(ctx, out)
    return {"steps": training["steps"], "steps_asked": options.steps, "stopped_by": stopped}


def upload_policy(ctx: JobContext, folder: Path) -> list[dict[str, Any]]:
    """The policy's files under ``policies/<policy id>/``."""
    files = []
    for kind, name in POLICY_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        ctype = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        obj = ctx.storage.put_file(f"{outputs.policy_prefix(policy_id(ctx))}{name}", path, ctype)
        files.append({"kind": kind, "name": name, "key": obj.key, "sha256": obj.sha256, "size": obj.size,
                      "content_type": ctype})
    return files


def stage_register(ctx: JobContext) -> dict[str, Any]:
    """The policy's files as the job's artifacts, and what its row becomes when the job succeeds (written with
    the job's final status, so a policy is never ready before its job has succeeded)."""
    files = ctx.run.outputs["policy_files"]
    ctx.rows = [Artifact(job_id=ctx.job.id, kind=f["kind"], name=f["name"], key=f["key"], size=f["size"],
                         sha256=f["sha256"], content_type=f["content_type"]) for f in files]
    training = ctx.result["training"]
    metrics = {name: training[name] for name in ("steps", "steps_asked", "stopped_by", "wall_seconds",
                                                 "plan_evaluations", "final_return")}
    metrics["search"] = ctx.result.get("search", {}).get("data")
    ident = policy_id(ctx)
    ctx.result["policy"] = {"id": ident, "uri": f"{outputs.STORE_SCHEME}{outputs.policy_prefix(ident).rstrip('/')}",
                            "fingerprint": training["fingerprint"], "metrics": metrics}
    return {"policy": ident, "artifacts": [f["name"] for f in files]}


STAGE_FUNCS: dict[str, Callable[[JobContext], dict[str, Any]]] = {
    "load": stage_load,
    "search_setup": stage_search_setup,
    "train": stage_train,
    "register": stage_register,
}


def restore_load(ctx: JobContext) -> None:
    if "train" not in ctx.run.outputs.get("completed", []):  # register needs no model
        ctx.loaded = stages.load(ctx)


def restore_search_setup(ctx: JobContext) -> None:
    """Recomputed (seconds; deterministic), unless training is done already."""
    if "train" not in ctx.run.outputs.get("completed", []):
        stage_search_setup(ctx)


# What a retry redoes for a stage an earlier attempt finished (in-memory state only).
RESTORE: dict[str, Callable[[JobContext], None]] = {
    "load": restore_load,
    "search_setup": restore_search_setup,
}
