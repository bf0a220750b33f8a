"""Allocators: a global sparsity budget -> per-layer pruning ratios (the baselines HiPP-Prune must beat).

Each allocator is an object configured in its constructor (as SliceGPT's slicing schedulers) with one method,
:meth:`Allocator.layer_ratios`, or, when it decides the split between heads and MLP channels inside a layer
itself, :meth:`Allocator.layer_counts` (the default turns ratios into counts with ``counts_from_ratios``'
closest-attention-option rule, so an allocator that only gives ratios inherits that rule); it registers in
:data:`ALLOCATORS` under the name plans, the CLI and jobs use (``allocation``), and :func:`get_allocator`
builds one from that name. A new allocator is one class here (or a module in ``pruning.baselines``) with
``@ALLOCATORS.register("its-name")``.

- ``uniform`` (:class:`UniformAllocator`): the same ratio everywhere.
- ``owl`` (:class:`OWLAllocator`): OWL-style (Yin et al. 2024): layers with more activation outliers (Wanda
  scores above ``M`` times the layer mean) are pruned less, ratios spread over ``[s - lambda, s + lambda]``.
  Gap to the paper: ratios are min-max spread, not mean-centred (the faithful one is ``owl-paper`` in
  ``pruning.baselines.owl``), and the layer split uses the closest-attention-option rule.
- ``flap`` (:class:`FLAPAllocator`): FLAP-style (An et al. 2024): unit scores standardized per unit type over
  the whole model, the globally weakest units removed until the budget is met; a layer's ratio is what it lost.
  Gaps to the paper: no fluctuation metric (WIFV), standardization over the whole model, no bias compensation,
  and each layer's budget is re-split with the closest-attention-option rule instead of by the ranking.
- ``random`` (:class:`RandomAllocator`): Dirichlet-random shares of the budget (seeded).
- ``visual`` (:class:`VisualAllocator`): less pruning where the attention-flow visual sensitivity is high.

Ratios become feasible unit counts that hit the budget in ``layer_counts.counts_from_ratios``; which units go
is the criterion's business.

Imports the rest of ``pruning`` (plan accounting, criteria's scores, layer counts), ``errors`` and the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from worker.hipp.errors import OptionError
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import (
    LayerCounts,
    counts_from_ratios,
    kept_parameters,
    max_sparsity,
    validate_sparsity,
)
from worker.hipp.pruning.plan import ModelGeometry, attention_parameters, dense_layer_parameters, mlp_parameters
from worker.hipp.registry import Registry

OWL_M = 5.0
OWL_LAMBDA = 0.08
VISUAL_LAMBDA = 0.15


@dataclass
class AllocationContext:
    """Signals some allocators need, computed by the caller once per model, and the run's seed (allocators
    named by string are built with it)."""

    scores: Sequence[LayerScores] | None = None
    outlier_ratios: Sequence[float] | None = None
    sensitivity: Sequence[float] | None = None
    seed: int = 0


class Allocator:
    """Turns a global sparsity into per-layer ratios; settings are constructor arguments."""

    # Signals the caller must put in the context, beyond unit scores (see ``planner.allocation_context``).
    needs_outlier_ratios: ClassVar[bool] = False
    needs_sensitivity: ClassVar[bool] = False
    # True: the planner scores and selects layer by layer, each layer on calibration activations recomputed
    # through the layers already pruned (Wanda-sp as FLAP's code runs it); counts still come from this object.
    sequential: ClassVar[bool] = False

    @classmethod
    def for_run(cls, seed: int) -> Allocator:
        """The instance the name-based API builds for a run seeded with ``seed``: default settings (allocators
        that draw random numbers override this to take the seed)."""
        return cls()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Each default is defined through the other: a concrete allocator must override at least one.
        if cls.layer_ratios is Allocator.layer_ratios and cls.layer_counts is Allocator.layer_counts:
            raise TypeError(f"{cls.__name__} must define layer_ratios or layer_counts")

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        """One pruning ratio per layer for a global ``sparsity`` (feasibility is ``counts_from_ratios``' job).

        The default, for allocators that only define :meth:`layer_counts`: the share of each layer its counts
        remove (at MLP multiple 1)."""
        counts = self.layer_counts(geometry, sparsity, context, 1)
        kept = kept_parameters(geometry, counts)
        return [1.0 - k / dense_layer_parameters(s, geometry.hidden_size)
                for k, s in zip(kept, geometry.layers, strict=True)]

    def layer_counts(
        self, geometry: ModelGeometry, sparsity: float, context: AllocationContext, mlp_multiple: int
    ) -> list[LayerCounts]:
        """Kept heads (KV groups x query heads per group) and MLP channels per layer for a global ``sparsity``.

        The default splits each layer's ratio (:meth:`layer_ratios`) between heads and MLP channels with
        ``counts_from_ratios``' closest-attention-option rule; allocators that decide the split themselves
        (Wanda-sp's equal ratio, FLAP's global ranking) override this."""
        return counts_from_ratios(geometry, self.layer_ratios(geometry, sparsity, context), sparsity, mlp_multiple)


ALLOCATORS: Registry[type[Allocator]] = Registry("allocation", OptionError)


def spread(sparsity: float, signal: Sequence[float], amplitude: float) -> list[float]:
    """Ratios in ``[s - a, s + a]``: high ``signal`` -> less pruning. Constant signal -> uniform."""
    lo, hi = min(signal), max(signal)
    if hi - lo <= 1e-12:
        return [sparsity] * len(signal)
    amplitude = min(amplitude, sparsity, 1.0 - sparsity)
    return [sparsity + amplitude - 2 * amplitude * (x - lo) / (hi - lo) for x in signal]


@ALLOCATORS.register("uniform")
class UniformAllocator(Allocator):
    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        return [sparsity] * geometry.num_layers


@ALLOCATORS.register("owl")
class OWLAllocator(Allocator):
    """OWL-style: ``lam`` is the largest distance of a layer's ratio from the global sparsity.

    Gaps to OWL (Yin et al. 2024; the faithful one is ``owl-paper``, ``baselines.owl``): the ratios are min-max
    spread over ``[s - lam, s + lam]`` instead of mean-centred (so they do not average ``s`` before the budget
    correction), outliers are counted on ``o_proj``/``down_proj`` only, and each layer's ratio is split between
    heads and channels by the closest-attention-option rule."""

    needs_outlier_ratios = True

    def __init__(self, lam: float = OWL_LAMBDA) -> None:
        self.lam = lam

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        if context.outlier_ratios is None:
            raise OptionError(
                "owl allocation needs calibration outlier ratios (compute them with wanda-sp activations)"
            )
        return spread(sparsity, context.outlier_ratios, self.lam)


@ALLOCATORS.register("flap")
class FLAPAllocator(Allocator):
    """FLAP-style. Gaps to FLAP (An et al. 2024): Wanda-sp scores instead of the fluctuation metric (WIFV: input
    variance times squared weight-column norm), standardization over the whole model, no bias compensation, and
    each layer's removed share is re-split between heads and channels by the closest-attention-option rule
    instead of by the global ranking itself."""

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        if context.scores is None:
            raise OptionError("flap allocation needs unit importance scores")
        hidden = geometry.hidden_size
        units: list[tuple[float, int, int]] = []  # (standardized score, layer, parameter cost)
        for kind in ("heads", "channels"):
            values = torch.cat([getattr(s, kind).double() for s in context.scores])
            mean, std = values.mean(), values.std().clamp_min(1e-12)
            for layer, (shape, scores) in enumerate(zip(geometry.layers, context.scores, strict=True)):
                unit = (attention_parameters(shape, hidden, 1, 0) if kind == "heads"
                        else mlp_parameters(shape, hidden, 1))
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


@ALLOCATORS.register("random")
class RandomAllocator(Allocator):
    """Dirichlet(``concentration``) shares of the budget, seeded; no layer above ``max_ratio``."""

    def __init__(self, seed: int = 0, concentration: float = 3.0, max_ratio: float = 0.95) -> None:
        self.seed = seed
        self.concentration = concentration
        self.max_ratio = max_ratio

    @classmethod
    def for_run(cls, seed: int) -> Allocator:
        return cls(seed=seed)

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        # Dirichlet.sample takes no generator: seed the global RNG inside a fork so callers are unaffected.
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            shares = torch.distributions.Dirichlet(
                torch.full((geometry.num_layers,), self.concentration)
            ).sample()
        return [min(self.max_ratio, float(sparsity * geometry.num_layers * s)) for s in shares]


@ALLOCATORS.register("visual")
class VisualAllocator(Allocator):
    """``lam``: the largest distance of a layer's ratio from the global sparsity."""

    needs_sensitivity = True

    def __init__(self, lam: float = VISUAL_LAMBDA) -> None:
        self.lam = lam

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        if context.sensitivity is None:
            raise OptionError("visual allocation needs the attention-flow sensitivity of the model")
        return spread(sparsity, context.sensitivity, self.lam)


def get_allocator(name: str, seed: int = 0) -> Allocator:
    """The allocator registered as ``name``, built for a run seeded with ``seed``."""
    return ALLOCATORS.get(name).for_run(seed)


def _checked(
    geometry: ModelGeometry, sparsity: float, allocation: str | Allocator, context: AllocationContext | None
) -> tuple[Allocator, AllocationContext]:
    """The allocator and context for a run, after checking that ``sparsity`` is valid and reachable."""
    validate_sparsity(sparsity)
    context = context or AllocationContext()
    allocator = get_allocator(allocation, context.seed) if isinstance(allocation, str) else allocation
    ceiling = max_sparsity(geometry)
    if sparsity > ceiling:
        raise OptionError(
            f"sparsity {sparsity:.3f} cannot be reached: keeping one head per layer and no MLP removes "
            f"{ceiling:.3f}; ask for at most that"
        )
    return allocator, context


def allocation_ratios(
    geometry: ModelGeometry,
    sparsity: float,
    allocation: str | Allocator = "uniform",
    context: AllocationContext | None = None,
) -> list[float]:
    """Per-layer ratios for ``sparsity`` with ``allocation`` (an allocator, or its registered name), after
    checking that ``sparsity`` is valid and reachable."""
    allocator, context = _checked(geometry, sparsity, allocation, context)
    return allocator.layer_ratios(geometry, sparsity, context)


def allocate(
    geometry: ModelGeometry,
    sparsity: float,
    allocation: str | Allocator = "uniform",
    mlp_multiple: int = 1,
    context: AllocationContext | None = None,
) -> list[LayerCounts]:
    """Per-layer kept counts for ``sparsity`` with ``allocation`` (an allocator, or its registered name): the
    allocator's own :meth:`Allocator.layer_counts`, which decides the head / MLP split in each layer."""
    allocator, context = _checked(geometry, sparsity, allocation, context)
    return allocator.layer_counts(geometry, sparsity, context, mlp_multiple)


def outlier_ratios(scores_per_layer: Sequence[torch.Tensor], m: float = OWL_M) -> list[float]:
    """OWL's layer outlier ratio: the share of Wanda element scores above ``m`` times the layer mean."""
    ratios = []
    for scores in scores_per_layer:
        flat = scores.flatten().double()
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    return ratios
