"""Shapes kernels like: the default MLP-width multiple per device, and what rounding to it costs.

A pruned MLP whose width is an odd number (2753 channels) runs its GEMMs on partial tiles: tensor cores
(and CPU SIMD kernels) work on fixed blocks, so the last block is padded work. Rounding every kept width to a
multiple ``m`` avoids that; the allocator then moves MLP widths in steps of ``m`` and corrects the total so the
global budget is still met within half a step, but each layer lands up to a step away from its ratio.
:func:`rounding_cost` says what that costs in removed parameters, recorded in the plan's ``meta["rounding"]``
and shown by ``PruningPlan.summary()``.

Kept attention heads need no extra rounding: a head is ``head_dim`` rows of q_proj and ``head_dim``
columns of o_proj, so kept attention widths are multiples of ``head_dim`` (64 or 128 in the supported
families), already whole tiles.

The default multiples (:data:`DEFAULT_MLP_MULTIPLES`) come from ``bench/rounding.py``
(``bench/results/rounding.md``):

- ``cpu`` -> 1 (no rounding). The CPU run (a 2-core AVX2 EPYC shared with other work, one thread) measured no
  consistent gain from any multiple: per shape and batch the throughput of widths rounded to 8, 64 or 128 lies
  within about 10% of the odd width, either way and without a pattern, and over all shapes the bench's own pick
  is 1. Rounding that buys no time would only move the plan off its target, so CPU plans are not rounded;
  re-run on a quiet machine before changing it.
- ``cuda`` -> 64: from the tensor-core tile sizes, not yet measured here (no GPU was lent when this was
  written). bf16 MMA needs dimensions in multiples of 8 (16 bytes) at the least, and cuBLAS's GEMM tiles are
  64 or 128 wide, so 64 keeps every tile full for the 64-wide tiles and at most half a tile idle for the 128-wide
  ones. To be confirmed with ``python -m bench.rounding --device cuda --dtype bfloat16`` on the GPU; if 128 is
  measurably faster there, change the table here (the only place it is written).
- any other device -> 1 (no rounding): nothing was measured there.

Imports ``plan`` and ``layer_counts`` (the accounting and the ratios -> counts rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from worker.hipp.pruning.layer_counts import LayerCounts, counts_from_ratios, kept_parameters
from worker.hipp.pruning.plan import ModelGeometry, dense_layer_parameters

DEFAULT_MLP_MULTIPLES = {"cpu": 1, "cuda": 64}
UNMEASURED_DEVICE_MULTIPLE = 1


def default_mlp_multiple(device: str) -> int:
    """The MLP-width multiple plans built for ``device`` (``cpu``, ``cuda``, ``cuda:1``, ...) should use."""
    kind = device.split(":", 1)[0].strip().lower()
    return DEFAULT_MLP_MULTIPLES.get(kind, UNMEASURED_DEVICE_MULTIPLE)


@dataclass(frozen=True)
class RoundingCost:
    """Parameters removed with MLP widths rounded to ``mlp_multiple`` vs the same allocation unrounded.

    ``target_removed``: what the requested sparsity asks for; ``unrounded_removed``: what the allocation removes
    at multiple 1; ``removed``: what it removes at ``mlp_multiple``; ``shifted_parameters``: how many kept
    parameters moved between layers, summed over layers (rounding can keep the total and still move layers).
    """

    mlp_multiple: int
    prunable_parameters: int
    target_removed: int
    unrounded_removed: int
    removed: int
    shifted_parameters: int

    @property
    def extra_removed(self) -> int:
        """Parameters the rounded plan removes beyond the unrounded one (negative: it removes fewer)."""
        return self.removed - self.unrounded_removed

    @property
    def extra_points(self) -> float:
        """``extra_removed`` in points of sparsity (percent of the prunable parameters)."""
        return 100.0 * self.extra_removed / self.prunable_parameters

    @property
    def off_target_points(self) -> float:
        """How far the rounded plan's sparsity is from the requested one, in points."""
        return 100.0 * (self.removed - self.target_removed) / self.prunable_parameters

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extra_removed": self.extra_removed, "extra_points": self.extra_points,
                "off_target_points": self.off_target_points}


def rounding_cost(
    geometry: ModelGeometry, ratios: Sequence[float], sparsity: float, counts: Sequence[LayerCounts],
    mlp_multiple: int,
) -> RoundingCost:
    """The cost of ``counts`` (``ratios`` made feasible at ``mlp_multiple``) against the same ratios at 1, for
    allocators whose split is the closest-option rule (the policy, the "-style" allocators)."""
    return rounding_cost_against(geometry, sparsity, counts, counts_from_ratios(geometry, ratios, sparsity, 1),
                                 mlp_multiple)


def rounding_cost_against(
    geometry: ModelGeometry, sparsity: float, counts: Sequence[LayerCounts], unrounded: Sequence[LayerCounts],
    mlp_multiple: int,
) -> RoundingCost:
    """The cost of ``counts`` at ``mlp_multiple`` against ``unrounded``: what the same allocator chooses at
    multiple 1. Allocators that choose their own head/MLP split (Wanda-sp, FLAP) are compared with their own
    unrounded choice, not with the closest-option rule."""
    prunable = sum(dense_layer_parameters(s, geometry.hidden_size) for s in geometry.layers)
    kept, kept_unrounded = kept_parameters(geometry, counts), kept_parameters(geometry, unrounded)
    return RoundingCost(
        mlp_multiple=mlp_multiple,
        prunable_parameters=prunable,
        target_removed=round(sparsity * prunable),
        unrounded_removed=prunable - sum(kept_unrounded),
        removed=prunable - sum(kept),
        shifted_parameters=sum(abs(a - b) for a, b in zip(kept, kept_unrounded, strict=True)),
    )


def describe(rounding: dict[str, Any]) -> str:
    """One line for people: a plan's ``meta["rounding"]`` (as :meth:`RoundingCost.to_dict` wrote it)."""
    return (f"MLP widths rounded to multiples of {rounding['mlp_multiple']}: "
            f"{rounding['extra_removed']:+,} parameters removed vs unrounded ({rounding['extra_points']:+.3f} "
            f"sparsity points), {rounding['shifted_parameters']:,} moved between layers, "
            f"{rounding['off_target_points']:+.3f} points from the requested sparsity")
