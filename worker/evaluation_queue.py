"""Plan evaluations over workers: the ``hipp.evaluate_plans`` task's two sides.

The caller (a job's plan search, policy training) hands a batch of plans to :func:`batch_evaluator_for`'s
evaluator. With ``HIPP_EVALUATION_MODE=inprocess`` (the default, and the only mode of the embedded
deployment) that is the job's own :class:`PlanEvaluator`. With ``queue``, cache hits are answered locally and
the other plans are split into chunks of ``HIPP_EVALUATION_CHUNK``, sent as one Celery ``group`` to
``HIPP_EVALUATION_QUEUE`` and gathered in order from the result backend (bounded by
``HIPP_EVALUATION_TIMEOUT_S``; a failed chunk fails the batch with the worker's reason).

A message carries what a worker needs to rebuild the caller's evaluator: the model reference, dtype and
fingerprint (a worker whose copy differs refuses), how the evaluation set was built (the synthetic world's
search split, or the tenant's data sets by id and SHA-256, fetched by the worker) and its fingerprint, the
evaluator options, and the plans (``PruningPlan.to_dict``) with their ``ScoringMode``. Each worker process
keeps its last few evaluators by that description (:data:`EVALUATORS_PER_PROCESS`), so a model and its
evaluation set are loaded once, not per task; evaluation workers therefore keep their pool child
(``worker.evaluation_worker``) instead of the GPU workers' fresh child per task.

Same model, same code, same device and thread count: a worker's answer equals the caller's own evaluation
bit for bit, so where plans are scored does not change the trained policy or the chosen plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.config import Settings
from app.queue import EVALUATE_PLANS, evaluation_client
from worker.hipp.evaluation.batch import DelegatedEvaluations, InProcessEvaluations, PlanBatchEvaluator, PlanRequest
from worker.hipp.evaluation.plan_evaluator import EvalSet, PlanEvaluation, PlanEvaluator, ScoringMode
from worker.hipp.models.loading import dtype_name
from worker.hipp.policy.search import SearchSetup
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.plan import PruningPlan

log = logging.getLogger("hipp.evaluation_queue")

#: Evaluators a worker process keeps (model + prepared evaluation set each); the oldest unused one goes first.
EVALUATORS_PER_PROCESS = 2
#: How often a caller waiting for its evaluations checks for cancellation.
POLL_S = 0.5


class EvaluationQueueError(RuntimeError):
    """The evaluation queue did not answer a batch (timeout, a failed chunk): the job's attempt fails and is
    retried like any other infrastructure failure."""


# --- what identifies an evaluator -----------------------------------------------------------------------------
def world_search_spec(limit: int | None) -> dict[str, Any]:
    """The synthetic world's search split (``testbed_search_set``'s defaults), ``limit`` questions per split."""
    return {"kind": "world", "limit": limit}


def dataset_search_spec(pair: dict[str, Any], sqa_split: str, limit: int | None) -> dict[str, Any]:
    """The tenant's POPE / ScienceQA data sets (``{pope, scienceqa}`` references with ``id``, ``sha256``,
    ``key``), ScienceQA split ``sqa_split``, ``limit`` questions per split."""
    refs = {kind: {k: ref[k] for k in ("id", "sha256", "key", "kind", "name") if k in ref}
            for kind, ref in pair.items() if ref}
    return {"kind": "datasets", "data": refs, "sqa_split": sqa_split, "limit": limit}


def evaluator_description(setup: SearchSetup, evalset_spec: dict[str, Any]) -> dict[str, Any]:
    """Everything a worker needs to rebuild ``setup``'s evaluator, and the fingerprints it must match."""
    evaluator = setup.evaluator
    return {
        "model": {"reference": setup.loaded.reference, "dtype": dtype_name(setup.loaded.dtype),
                  "fingerprint": setup.fingerprint},
        "evalset": {**evalset_spec, "fingerprint": evaluator.evalset.fingerprint()},
        "options": {"s_max": evaluator.mode.s_max, "target_sparsity": evaluator.mode.target_sparsity,
                    "batch_size": evaluator.batch_size},
    }


def description_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


# --- the caller's side ----------------------------------------------------------------------------------------
class QueueSender:
    """Sends the plans a :class:`DelegatedEvaluations` misses to the evaluation queue and gathers the answers.
    ``workers`` collects the names of the workers that answered (benchmarks and tests read it)."""

    def __init__(self, settings: Settings, description: dict[str, Any]) -> None:
        if settings.resolved_result_backend is None:  # settings with queue mode refuse this already
            raise EvaluationQueueError("the evaluation queue needs a result backend (HIPP_RESULT_BACKEND_URL)")
        self.settings = settings
        self.description = description
        self.client = evaluation_client(settings)
        self.workers: set[str] = set()

    def __call__(self, requests: Sequence[PlanRequest], reporter: Reporter = SILENT) -> list[PlanEvaluation]:
        from celery import group

        size = self.settings.evaluation_chunk
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        signatures = [self.client.signature(EVALUATE_PLANS, args=[self.message(chunk)],
                                            queue=self.settings.evaluation_queue, ignore_result=False)
                      for chunk in chunks]
        result = group(signatures, app=self.client).apply_async()
        try:
            answers = self._gather(result, reporter)
        finally:
            result.forget()  # the answers are read; nothing else needs them in the backend
        evaluations = []
        for answer in answers:
            self.workers.add(str(answer["worker"]))
            evaluations += [PlanEvaluation.from_dict(e) for e in answer["evaluations"]]
        return evaluations

    def message(self, chunk: Sequence[PlanRequest]) -> dict[str, Any]:
        return {**self.description,
                "plans": [{"plan": plan.to_dict(), "mode": {"s_max": mode.s_max,
                                                            "target_sparsity": mode.target_sparsity}}
                          for plan, mode in chunk]}

    def _gather(self, result: Any, reporter: Reporter) -> list[dict[str, Any]]:
        """The chunks' answers in order; checks for cancellation while waiting (a cancelled job stops waiting at
        once; its chunks still finish on the workers, into the cache of whoever asks next)."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        deadline = time.monotonic() + self.settings.evaluation_timeout_s
        while True:
            reporter.check()
            left = deadline - time.monotonic()
            if left <= 0:
                done = sum(r.ready() for r in result.results)
                raise EvaluationQueueError(
                    f"plan evaluations timed out after {self.settings.evaluation_timeout_s:.0f}s: {done} of "
                    f"{len(result.results)} chunks answered on queue {self.settings.evaluation_queue!r}; are "
                    "evaluation workers running (docs/service.md, Scaling plan evaluations)?")
            try:
                # The caller may itself be a Celery task (the job): waiting on other tasks is what it is for.
                return list(result.get(timeout=min(POLL_S, left), disable_sync_subtasks=False))
            except CeleryTimeout:
                continue
            except Exception as exc:
                raise EvaluationQueueError(f"an evaluation worker failed a chunk of plans: "
                                           f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.client.close()


def batch_evaluator_for(settings: Settings, setup: SearchSetup, evalset_spec: dict[str, Any]) -> PlanBatchEvaluator:
    """The batch evaluator the settings ask for, for ``setup`` (whose evaluation set was built as
    ``evalset_spec`` says: :func:`world_search_spec`, :func:`dataset_search_spec`): in process, or through the
    evaluation queue (cache hits still answered here)."""
    if settings.evaluation_mode == "inprocess":
        return InProcessEvaluations(setup.evaluator)
    return DelegatedEvaluations(setup.evaluator, QueueSender(settings, evaluator_description(setup, evalset_spec)))


# --- the worker's side ----------------------------------------------------------------------------------------
_evaluators: OrderedDict[str, PlanEvaluator] = OrderedDict()  # this process's, by description_key


def evaluate_message(message: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """The evaluations (as dicts) of the message's plans, with the evaluator it describes (built once per
    process)."""
    description = {k: message[k] for k in ("model", "evalset", "options")}
    evaluator = evaluator_for(description, settings)
    results = []
    for item in message["plans"]:
        plan = PruningPlan.from_dict(item["plan"])
        mode = ScoringMode(float(item["mode"]["s_max"]), item["mode"]["target_sparsity"])
        results.append(evaluator.evaluate(plan, mode=mode).to_dict())
    return results


def evaluator_for(description: dict[str, Any], settings: Settings) -> PlanEvaluator:
    key = description_key(description)
    if key in _evaluators:
        _evaluators.move_to_end(key)
        return _evaluators[key]
    evaluator = build_evaluator(description, settings)
    _evaluators[key] = evaluator
    while len(_evaluators) > EVALUATORS_PER_PROCESS:
        _evaluators.popitem(last=False)
    return evaluator


def build_evaluator(description: dict[str, Any], settings: Settings) -> PlanEvaluator:
    """Load the model and the evaluation set the description names, refusing copies that differ from the
    caller's (another model version under the same reference, other data)."""
    from worker.hipp import job as engine
    from worker.hipp.models.loading import load_model
    from worker.hipp.policy.store import model_fingerprint
    from worker.pipeline.stages import hub_ids_from_the_hub

    model = description["model"]
    started = time.perf_counter()
    with hub_ids_from_the_hub(model["reference"]):
        loaded = load_model(model["reference"], dtype=model["dtype"], device=engine.resolve_device(settings.device))
    found = model_fingerprint(loaded.adapter)
    if found != model["fingerprint"]:
        raise EvaluationQueueError(f"model {model['reference']!r} on this evaluation worker has fingerprint "
                                   f"{found}, the job's has {model['fingerprint']}: the workers must see the same "
                                   "model files")
    evalset = build_evalset(description["evalset"], settings)
    found = evalset.fingerprint()
    if found != description["evalset"]["fingerprint"]:
        raise EvaluationQueueError(f"the evaluation set rebuilt here has fingerprint {found}, the job's has "
                                   f"{description['evalset']['fingerprint']}")
    options = description["options"]
    evaluator = PlanEvaluator(loaded, evalset, s_max=float(options["s_max"]),
                              target_sparsity=options["target_sparsity"], batch_size=int(options["batch_size"]))
    log.info("evaluator for %s (%d questions) ready in %.1fs", model["reference"], evalset.size(),
             time.perf_counter() - started)
    return evaluator


def build_evalset(spec: dict[str, Any], settings: Settings) -> EvalSet:
    """The evaluation set ``spec`` describes, its files under the worker's work folder. Evaluation workers on
    one machine share that folder: one at a time writes (or fetches) them, the others then find them."""
    import fcntl

    folder = settings.resolved_work_dir / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_evalset(spec, settings, folder)


def _build_evalset(spec: dict[str, Any], settings: Settings, folder: Path) -> EvalSet:
    limit = spec.get("limit")
    if spec["kind"] == "world":
        from worker.hipp.policy.search import testbed_search_set

        return testbed_search_set(folder / "world-search", limit=limit)
    if spec["kind"] == "datasets":
        return dataset_evalset(spec, settings, folder / "data")
    raise EvaluationQueueError(f"unknown evaluation set kind {spec['kind']!r}")


def dataset_evalset(spec: dict[str, Any], settings: Settings, folder: Path) -> EvalSet:
    """The tenant's search data sets, fetched from the store into ``folder`` (once per data set and worker) and
    found as the job found them (``worker.pipeline.data``)."""
    from app.storage import get_storage
    from worker.pipeline import data

    storage = get_storage(settings)
    refs = spec["data"]
    pope_dir = sqa_dir = None
    if refs.get("pope"):
        pope_dir = data.pope_folder(data.fetch_dataset(storage, settings, refs["pope"],
                                                       folder / str(refs["pope"]["id"])))
    if refs.get("scienceqa"):
        sqa_dir = data.scienceqa_folder(data.fetch_dataset(storage, settings, refs["scienceqa"],
                                                           folder / str(refs["scienceqa"]["id"])))
    return EvalSet.from_dirs(pope_dir, sqa_dir, spec["sqa_split"], limit=spec.get("limit"))
