"""Orchestration: calibration -> importance scores -> allocation -> selection -> a validated plan.

This is the only place the three decisions meet; each stays in its own module (``importance``,
``allocation``, and :func:`select_units` here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.hipp.adapters.base import LayerShape
from worker.hipp.allocation import LayerCounts, allocate, validate_sparsity
from worker.hipp.calibration import (
    CalibrationSample,
    LayerActivations,
    collect_activations,
    synthetic_samples,
)
from worker.hipp.importance import LayerScores, get_criterion
from worker.hipp.loading import LoadedModel
from worker.hipp.plan import LayerPlan, PruningPlan, geometry_of
from worker.hipp.progress import SILENT, Reporter


def select_units(shape: LayerShape, counts: LayerCounts, scores: LayerScores) -> LayerPlan:
    """Keep the best KV groups, the best query heads inside each, and the best MLP channels."""
    group_scores = scores.kv_group_scores(shape.num_kv_heads)
    kv = sorted(_top(group_scores, counts.kv_heads))
    heads: list[int] = []
    for g in kv:
        block = scores.heads[g * shape.group_size : (g + 1) * shape.group_size]
        heads += [g * shape.group_size + h for h in _top(block, counts.heads_per_group)]
    channels = sorted(_top(scores.channels, counts.channels))
    return LayerPlan(tuple(sorted(heads)), tuple(kv), tuple(channels))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    if k <= 0:
        return []
    # Stable tie-break by index keeps plans deterministic on constant scores.
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order[:k]


@dataclass
class ScoringResult:
    scores: list[LayerScores]
    activations: list[LayerActivations] | None


def score_model(
    loaded: LoadedModel,
    criterion: str = "wanda-sp",
    samples: Sequence[CalibrationSample] | None = None,
    batch_size: int = 8,
    max_length: int | None = 1024,
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> ScoringResult:
    """Per-layer unit scores with ``criterion`` (calibrating first when it needs activations)."""
    crit = get_criterion(criterion, seed=seed)
    activations = None
    if crit.needs_activations:
        reporter.stage("calibrate", f"activation statistics for {criterion}")
        if samples is None:
            samples = synthetic_samples(32, seed=seed)
        activations = collect_activations(loaded, samples, batch_size, max_length, reporter)
    reporter.stage("score", f"{criterion} importance")
    scores = []
    for i, layer in enumerate(reporter.track(loaded.adapter.layers(), message="layers")):
        scores.append(crit.score_layer(layer, activations[i] if activations else None))
    return ScoringResult(scores, activations)


def plan_from_counts(
    loaded: LoadedModel, counts: Sequence[LayerCounts], scores: Sequence[LayerScores], mlp_multiple: int = 1,
    meta: dict[str, object] | None = None,
) -> PruningPlan:
    geometry = geometry_of(loaded.adapter)
    layers = [select_units(s, c, sc) for s, c, sc in zip(geometry.layers, counts, scores, strict=True)]
    plan = PruningPlan(geometry, layers, mlp_multiple=mlp_multiple, meta=dict(meta or {}))
    plan.validate()
    return plan


def build_plan(
    loaded: LoadedModel,
    sparsity: float,
    criterion: str = "wanda-sp",
    allocation: str = "uniform",
    mlp_multiple: int = 1,
    samples: Sequence[CalibrationSample] | None = None,
    seed: int = 0,
    reporter: Reporter = SILENT,
    scoring: ScoringResult | None = None,
) -> PruningPlan:
    """A plan that removes ``sparsity`` of the prunable LM-decoder parameters."""
    validate_sparsity(sparsity)
    geometry = geometry_of(loaded.adapter)
    counts = allocate(geometry, sparsity, allocation, mlp_multiple)
    if scoring is None:
        scoring = score_model(loaded, criterion, samples, seed=seed, reporter=reporter)
    reporter.stage("plan", f"{allocation} allocation")
    meta = {"model": loaded.reference, "criterion": criterion, "allocation": allocation,
            "requested_sparsity": sparsity, "seed": seed}
    return plan_from_counts(loaded, counts, scoring.scores, mlp_multiple, meta)
