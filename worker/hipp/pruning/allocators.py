"""Allocators: a global sparsity budget -> per-layer pruning ratios (the baselines HiPP-Prune must beat).

- ``uniform``: the same ratio everywhere.
- ``owl``: OWL-style (Yin et al. 2024): layers with more activation outliers (Wanda scores above ``M`` times
  the layer mean) are pruned less, ratios spread over ``[s - lambda, s + lambda]``.
- ``flap``: FLAP-style (An et al. 2024): unit scores standardized per unit type over the whole model, the
  globally weakest units removed until the budget is met; a layer's ratio is what it lost.
- ``random``: Dirichlet-random shares of the budget (seeded).
- ``visual``: less pruning where the attention-flow visual sensitivity is high.

Ratios become feasible unit counts that hit the budget in ``allocation.counts_from_ratios``; which units go
is the criterion's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.hipp.errors import OptionError
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import LayerCounts, counts_from_ratios, max_sparsity, validate_sparsity
from worker.hipp.pruning.plan import ModelGeometry, attention_parameters, dense_layer_parameters, mlp_parameters

OWL_M = 5.0
OWL_LAMBDA = 0.08
VISUAL_LAMBDA = 0.15


@dataclass
class AllocationContext:
    """Signals some allocators need; computed by the caller once per model."""

    scores: Sequence[LayerScores] | None = None
    outlier_ratios: Sequence[float] | None = None
    sensitivity: Sequence[float] | None = None
    seed: int = 0


Allocator = Callable[[ModelGeometry, float, AllocationContext], list[float]]


def uniform_ratios(geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
    return [sparsity] * geometry.num_layers


def spread(sparsity: float, signal: Sequence[float], amplitude: float) -> list[float]:
    """Ratios in ``[s - a, s + a]``: high ``signal`` -> less pruning. Constant signal -> uniform."""
    lo, hi = min(signal), max(signal)
    if hi - lo <= 1e-12:
        return [sparsity] * len(signal)
    amplitude = min(amplitude, sparsity, 1.0 - sparsity)
    return [sparsity + amplitude - 2 * amplitude * (x - lo) / (hi - lo) for x in signal]


def owl_ratios(geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
    if context.outlier_ratios is None:
        raise OptionError("owl allocation needs calibration outlier ratios (compute them with wanda-sp activations)")
    return spread(sparsity, context.outlier_ratios, OWL_LAMBDA)


def visual_ratios(geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
    if context.sensitivity is None:
        raise OptionError("visual allocation needs the attention-flow sensitivity of the model")
    return spread(sparsity, context.sensitivity, VISUAL_LAMBDA)


def random_ratios(geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
    # Dirichlet.sample takes no generator: seed the global RNG inside a fork so callers are unaffected.
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        shares = torch.distributions.Dirichlet(torch.full((geometry.num_layers,), 3.0)).sample()
    return [min(0.95, float(sparsity * geometry.num_layers * s)) for s in shares]


def flap_ratios(geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
    if context.scores is None:
        raise OptionError("flap allocation needs unit importance scores")
    hidden = geometry.hidden_size
    units: list[tuple[float, int, int]] = []  # (standardized score, layer, parameter cost)
    for kind in ("heads", "channels"):
        values = torch.cat([getattr(s, kind).double() for s in context.scores])
        mean, std = values.mean(), values.std().clamp_min(1e-12)
        for layer, (shape, scores) in enumerate(zip(geometry.layers, context.scores, strict=True)):
            unit = attention_parameters(shape, hidden, 1, 0) if kind == "heads" else mlp_parameters(shape, hidden, 1)
            z = (getattr(scores, kind).double() - mean) / std
            units += [(float(v), layer, unit) for v in z]
    budget = sparsity * sum(dense_layer_parameters(s, hidden) for s in geometry.layers)
    removed = [0.0] * geometry.num_layers
    total = 0.0
    for _, layer, cost in sorted(units):
        if total >= budget:
            break
        removed[layer] += cost
        total += cost
    return [r / dense_layer_parameters(s, hidden) for r, s in zip(removed, geometry.layers, strict=True)]


ALLOCATORS: dict[str, Allocator] = {
    "uniform": uniform_ratios,
    "owl": owl_ratios,
    "flap": flap_ratios,
    "random": random_ratios,
    "visual": visual_ratios,
}


def get_allocator(name: str) -> Allocator:
    if name not in ALLOCATORS:
        raise OptionError(f"unknown allocation {name!r}; use one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def allocate(
    geometry: ModelGeometry,
    sparsity: float,
    allocation: str = "uniform",
    mlp_multiple: int = 1,
    context: AllocationContext | None = None,
) -> list[LayerCounts]:
    """Per-layer kept counts for ``sparsity`` with the named allocator."""
    validate_sparsity(sparsity)
    allocator = get_allocator(allocation)
    ceiling = max_sparsity(geometry)
    if sparsity > ceiling:
        raise OptionError(
            f"sparsity {sparsity:.3f} cannot be reached: keeping one head per layer and no MLP removes "
            f"{ceiling:.3f}; ask for at most that"
        )
    ratios = allocator(geometry, sparsity, context or AllocationContext())
    return counts_from_ratios(geometry, ratios, sparsity, mlp_multiple)


def outlier_ratios(scores_per_layer: Sequence[torch.Tensor], m: float = OWL_M) -> list[float]:
    """OWL's layer outlier ratio: the share of Wanda element scores above ``m`` times the layer mean."""
    ratios = []
    for scores in scores_per_layer:
        flat = scores.flatten().double()
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    return ratios
