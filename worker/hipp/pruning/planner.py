"""Orchestration: calibration -> importance scores -> allocation -> selection -> a validated plan.

This is the only place the three decisions meet; each stays in its own module (``criteria``,
``allocators`` with ``layer_counts``, and :func:`select_units` here). Plans built with an MLP-width multiple
record what the rounding cost (``rounding``) in ``meta["rounding"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.hipp.data.calibration import (
    CalibrationSample,
    LayerActivations,
    collect_activations,
    synthetic_samples,
)
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.models.loading import LoadedModel
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning import baselines  # noqa: F401  (registers the faithful baselines' allocators)
from worker.hipp.pruning.allocators import (
    ALLOCATORS,
    AllocationContext,
    Allocator,
    allocate,
    get_allocator,
    outlier_ratios,
)
from worker.hipp.pruning.criteria import LayerScores, get_criterion
from worker.hipp.pruning.layer_counts import LayerCounts, validate_sparsity
from worker.hipp.pruning.masking import PlanMasks
from worker.hipp.pruning.plan import LayerPlan, ModelGeometry, PruningPlan, geometry_of
from worker.hipp.pruning.rounding import rounding_cost_against


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
    with_activations: bool = False,
) -> ScoringResult:
    """Per-layer unit scores with ``criterion`` (calibrating first when it, or the caller, needs activations)."""
    crit = get_criterion(criterion, seed=seed)
    activations = None
    if crit.needs_activations or with_activations:
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


def select_sequentially(
    loaded: LoadedModel,
    geometry: ModelGeometry,
    counts: Sequence[LayerCounts],
    criterion: str,
    samples: Sequence[CalibrationSample],
    seed: int = 0,
    reporter: Reporter = SILENT,
    batch_size: int = 8,
    max_length: int | None = 1024,
) -> tuple[list[LayerPlan], list[LayerScores]]:
    """Layer by layer: calibrate with the layers before ``i`` already pruned (masks), score layer ``i``, keep
    its best units; as FLAP's repository runs Wanda-sp. Returns the layer plans and the scores they used.

    One calibration pass per layer (the whole model runs; only layer ``i``'s statistics are used): ``L`` times
    the cost of one-shot scoring."""
    crit = get_criterion(criterion, seed=seed)
    layers = [LayerPlan.dense(shape) for shape in geometry.layers]
    scores: list[LayerScores] = []
    adapters = loaded.adapter.layers()
    reporter.stage("score", f"{criterion} importance, layer by layer through the pruned layers")
    for i, shape in enumerate(reporter.track(list(geometry.layers), message="layers")):
        activations = None
        if crit.needs_activations:
            with PlanMasks(loaded.adapter, PruningPlan(geometry, list(layers))):
                activations = collect_activations(loaded, samples, batch_size, max_length)
        layer_scores = crit.score_layer(adapters[i], activations[i] if activations else None)
        scores.append(layer_scores)
        layers[i] = select_units(shape, counts[i], layer_scores)
    return layers, scores


def owl_outlier_ratios(loaded: LoadedModel, activations: Sequence[LayerActivations]) -> list[float]:
    """Wanda element scores of each layer's head and MLP consumers -> OWL outlier ratio per layer."""
    per_layer = []
    for layer, act in zip(loaded.adapter.layers(), activations, strict=True):
        down = layer.down_proj.weight.detach().abs().float().cpu() * act.down_proj_norm.float()[None, :]
        o = layer.o_proj.weight.detach().abs().float().cpu() * act.o_proj_norm.float()[None, :]
        per_layer.append(torch.cat([down.flatten(), o.flatten()]))
    return outlier_ratios(per_layer)


def allocator_class(allocation: str | Allocator) -> type[Allocator]:
    """The class of ``allocation`` (a registered name or an allocator): what it needs is declared there."""
    return ALLOCATORS.get(allocation) if isinstance(allocation, str) else type(allocation)


def allocation_name(allocation: str | Allocator) -> str:
    """The registered name of ``allocation`` (an allocator's class may be registered under several names)."""
    if isinstance(allocation, str):
        return allocation
    return next((n for n in ALLOCATORS.names() if ALLOCATORS.get(n) is type(allocation)), type(allocation).__name__)


def allocation_context(
    loaded: LoadedModel,
    allocation: str | Allocator,
    scoring: ScoringResult,
    samples: Sequence[CalibrationSample],
    seed: int = 0,
    reporter: Reporter = SILENT,
) -> AllocationContext:
    """The signals ``allocation`` needs, computed from the scoring pass (and attention flow for ``visual``)."""
    allocator = allocator_class(allocation)
    context = AllocationContext(scores=scoring.scores, seed=seed)
    if allocator.needs_outlier_ratios:
        assert scoring.activations is not None, f"score_model(with_activations=True) is needed for {allocation}"
        context.outlier_ratios = owl_outlier_ratios(loaded, scoring.activations)
    if allocator.needs_sensitivity:
        from worker.hipp.sensitivity import compute_visual_sensitivity

        reporter.stage("sensitivity", "attention flow")
        context.sensitivity = compute_visual_sensitivity(loaded, samples, reporter=reporter).normalized()
    return context


def build_plan(
    loaded: LoadedModel,
    sparsity: float,
    criterion: str = "wanda-sp",
    allocation: str | Allocator = "uniform",
    mlp_multiple: int = 1,
    samples: Sequence[CalibrationSample] | None = None,
    seed: int = 0,
    reporter: Reporter = SILENT,
    scoring: ScoringResult | None = None,
    context: AllocationContext | None = None,
) -> PruningPlan:
    """A plan that removes ``sparsity`` of the prunable LM-decoder parameters with ``allocation`` (a registered
    name, built for ``seed``, or an allocator with its own settings, recorded in ``meta["allocator"]``)."""
    validate_sparsity(sparsity)
    allocator = allocator_class(allocation)
    geometry = geometry_of(loaded.adapter)
    samples = samples if samples is not None else synthetic_samples(32, seed=seed)
    if scoring is None:
        scoring = score_model(loaded, criterion, samples, seed=seed, reporter=reporter,
                              with_activations=allocator.needs_outlier_ratios)
    if context is None:
        context = allocation_context(loaded, allocation, scoring, samples, seed, reporter)
    name = allocation_name(allocation)
    reporter.stage("plan", f"{name} allocation")
    built = get_allocator(allocation, context.seed) if isinstance(allocation, str) else allocation
    counts = allocate(geometry, sparsity, built, mlp_multiple, context)
    meta: dict[str, object] = {"model": loaded.reference, "criterion": criterion, "allocation": name,
                               "requested_sparsity": sparsity, "seed": seed}
    if not isinstance(allocation, str):
        meta["allocator"] = dict(vars(allocation))
    if mlp_multiple > 1:
        unrounded = allocate(geometry, sparsity, built, 1, context)  # the allocator's own split, unrounded
        meta["rounding"] = rounding_cost_against(geometry, sparsity, counts, unrounded, mlp_multiple).to_dict()
    if built.sequential:
        layers, _ = select_sequentially(loaded, geometry, counts, criterion, samples, seed, reporter)
        meta["sequential"] = True
        plan = PruningPlan(geometry, layers, mlp_multiple=mlp_multiple, meta=meta)
        plan.validate()
        return plan
    return plan_from_counts(loaded, counts, scoring.scores, mlp_multiple, meta)
