"""The baseline grid: every baseline allocator at several sparsities, scored by the plan evaluator.

Uniform allocation runs with both magnitude and Wanda-sp; the non-uniform allocators (OWL-style, FLAP-style,
random, visual-sensitivity) with Wanda-sp, so allocation is what differs between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.hipp.data.calibration import CalibrationSample
from worker.hipp.evaluation.plan_evaluator import PlanEvaluation, PlanEvaluator
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.allocators import get_allocator
from worker.hipp.pruning.plan import PruningPlan
from worker.hipp.pruning.planner import allocation_context, build_plan, score_model

ALL_BASELINES = ("uniform/magnitude", "uniform/wanda-sp", "owl/wanda-sp", "flap/wanda-sp", "random/wanda-sp",
                 "visual/wanda-sp")


def metrics_row(name: str, sparsity: float, metrics: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    pope = metrics.get("pope", {})
    return {"baseline": name, "sparsity": round(sparsity, 4),
            **{f"{k}_bacc": round(v["balanced_accuracy"], 4) for k, v in pope.items()},
            **{f"{k}_yes": round(v["yes_ratio"], 4) for k, v in pope.items()},
            "pope_bacc": round(PlanEvaluator.pope_balanced_accuracy(metrics), 4),
            "sqa": round(metrics.get("scienceqa", {}).get("accuracy", float("nan")), 4),
            "seconds": round(seconds, 2) if seconds is not None else None}


def baseline_plans(loaded: LoadedModel, samples: Sequence[CalibrationSample], sparsities: Sequence[float],
                   baselines: Sequence[str] = ALL_BASELINES, seed: int = 0,
                   reporter: Reporter = SILENT) -> list[tuple[str, float, PruningPlan]]:
    """(name, requested sparsity, plan) for every baseline and sparsity."""
    wanted = [b.split("/") for b in baselines]
    for allocation, _ in wanted:
        get_allocator(allocation)
    plans = []
    for criterion in sorted({c for _, c in wanted}):
        scoring = score_model(loaded, criterion, samples, seed=seed, reporter=reporter, with_activations=True)
        for allocation, crit in wanted:
            if crit != criterion:
                continue
            context = allocation_context(loaded, allocation, scoring, samples, seed, reporter)
            for s in sparsities:
                plan = build_plan(loaded, s, criterion, allocation, samples=samples, seed=seed, scoring=scoring,
                                  context=context)
                plans.append((f"{allocation}/{criterion}", s, plan))
    return plans


def evaluate_baselines(loaded: LoadedModel, evaluator: PlanEvaluator, samples: Sequence[CalibrationSample],
                       sparsities: Sequence[float], baselines: Sequence[str] = ALL_BASELINES, seed: int = 0,
                       reporter: Reporter = SILENT) -> list[tuple[str, float, PruningPlan, PlanEvaluation]]:
    results = []
    plans = baseline_plans(loaded, samples, sparsities, baselines, seed, reporter)
    reporter.stage("evaluate", f"{len(plans)} baseline plans")
    for name, s, plan in reporter.track(plans, message="baselines"):
        results.append((name, s, plan, evaluator.evaluate(plan, prescreen=False)))
    return results
