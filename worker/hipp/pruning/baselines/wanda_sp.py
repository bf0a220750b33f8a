"""Wanda-sp as in FLAP's repository (``prune_wanda_sp``): the same ratio for heads and MLP channels in every
layer, pruned layer by layer.

FLAP's code removes ``int(ratio * num_heads)`` heads and ``int(ratio * width)`` channels of each layer, scoring
them with ``|W| * sqrt(mean squared input)`` of ``o_proj`` / ``down_proj`` on calibration inputs that have been
through the layers already pruned. Here:

- :func:`equal_split_counts` gives every layer its ratio on both unit types: kept query heads are the
  GQA-valid count closest to ``(1 - r) * num_heads`` (ties: more heads), the KV-group x heads-per-group shape
  with that count is the one that keeps the most head score (the ranking decides, as FLAP's code does for
  single heads; without scores: more KV groups), kept channels ``(1 - r) * width``. The GQA rounding of heads
  moves a layer off its ratio, so MLP widths are then corrected (``layer_counts.correct_mlp_widths``) until
  the global budget is met within half an MLP step: the global sparsity stays matched to other methods.
- :class:`WandaSPAllocator` (``wanda-sp``) is uniform with that split and sets ``sequential``: the planner
  (``planner.select_sequentially``) then recomputes the calibration activations of layer ``i`` with layers
  ``< i`` already pruned (masks) before scoring and selecting its units. The counts (and the GQA shape) are
  decided before, from one-shot scores: the gap to FLAP's code is that shape choice, which FLAP's MHA models
  do not have.

Imports ``allocators``, ``layer_counts``, ``plan`` and ``criteria``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import ClassVar

from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.allocators import ALLOCATORS, AllocationContext, Allocator
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import LayerCounts, attention_options, correct_mlp_widths, round_channels
from worker.hipp.pruning.plan import ModelGeometry, dense_layer_parameters


def kept_head_score(shape: LayerShape, kv: int, q: int, scores: LayerScores) -> float:
    """Head score kept by the shape (``kv`` groups x ``q`` heads), selected as ``planner.select_units`` does:
    the best groups by summed score, the best ``q`` heads inside each."""
    groups = scores.kv_group_scores(shape.num_kv_heads)
    best = sorted(range(shape.num_kv_heads), key=lambda g: (-float(groups[g]), g))[:kv]
    total = 0.0
    for g in best:
        block = sorted((float(x) for x in scores.heads[g * shape.group_size:(g + 1) * shape.group_size]),
                       reverse=True)
        total += sum(block[:q])
    return total


def equal_ratio_shape(shape: LayerShape, ratio: float, scores: LayerScores | None = None) -> tuple[int, int]:
    """(kept KV groups, query heads per group) for removing ``ratio`` of the query heads."""
    want = shape.num_heads - int(ratio * shape.num_heads + 1e-9)  # FLAP's code: int(ratio * n) removed
    options = attention_options(shape)
    count = min({kv * q for kv, q in options}, key=lambda n: (abs(n - want), -n))
    same = [(kv, q) for kv, q in options if kv * q == count]
    if scores is None:
        return max(same)
    return max(same, key=lambda o: (kept_head_score(shape, o[0], o[1], scores), o[0]))


def equal_split_counts(
    geometry: ModelGeometry,
    ratios: Sequence[float],
    sparsity: float,
    mlp_multiple: int = 1,
    scores: Sequence[LayerScores] | None = None,
    frozen: Collection[int] = (),
) -> list[LayerCounts]:
    """Per layer, heads and channels both at the layer's ratio; then MLP widths corrected (never in ``frozen``
    layers) so that the removed total hits ``sparsity`` within half a step."""
    counts = []
    for i, (shape, r) in enumerate(zip(geometry.layers, ratios, strict=True)):
        r = min(max(r, 0.0), 1.0)
        kv, q = equal_ratio_shape(shape, r, scores[i] if scores is not None else None)
        width = shape.intermediate_size
        channels = round_channels(width - math.floor(r * width + 1e-9), width, mlp_multiple)
        counts.append(LayerCounts(kv, q, channels))
    target = sparsity * sum(dense_layer_parameters(s, geometry.hidden_size) for s in geometry.layers)
    return correct_mlp_widths(geometry, counts, ratios, target, mlp_multiple, frozen)


@ALLOCATORS.register("wanda-sp")
class WandaSPAllocator(Allocator):
    """Uniform ratio, heads and channels at that ratio in every layer, units chosen layer by layer."""

    sequential: ClassVar[bool] = True

    def layer_ratios(self, geometry: ModelGeometry, sparsity: float, context: AllocationContext) -> list[float]:
        return [sparsity] * geometry.num_layers

    def layer_counts(
        self, geometry: ModelGeometry, sparsity: float, context: AllocationContext, mlp_multiple: int
    ) -> list[LayerCounts]:
        ratios = self.layer_ratios(geometry, sparsity, context)
        return equal_split_counts(geometry, ratios, sparsity, mlp_multiple, context.scores)
