"""Allocation: how many units every layer keeps, given a global sparsity budget.

An allocator (``allocators``) turns a target sparsity into per-layer ratios; :func:`counts_from_ratios`
turns ratios into feasible unit counts (GQA-valid head counts, MLP widths rounded to a multiple) and then
corrects the MLP widths so that the removed parameters hit the global budget within one rounding unit. Which units go is
decided later by a criterion (see ``planner.select_units``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from worker.hipp.errors import OptionError, PlanError
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.plan import ModelGeometry, attention_parameters, dense_layer_parameters, mlp_parameters


@dataclass(frozen=True)
class LayerCounts:
    """Kept units of one layer: ``kv_heads`` groups with ``heads_per_group`` query heads each."""

    kv_heads: int
    heads_per_group: int
    channels: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group


def validate_sparsity(sparsity: float) -> float:
    if not (0.0 <= float(sparsity) < 1.0):
        raise OptionError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def attention_options(shape: LayerShape) -> list[tuple[int, int]]:
    """All GQA-valid (kept KV heads, query heads per group) pairs, at least one head."""
    return [(kv, q) for kv in range(1, shape.num_kv_heads + 1) for q in range(1, shape.group_size + 1)]


def counts_for_ratio(shape: LayerShape, hidden: int, ratio: float, mlp_multiple: int) -> LayerCounts:
    """Counts that remove about ``ratio`` of the layer, split evenly between attention and MLP."""
    keep = 1.0 - ratio
    dense_attention = attention_parameters(shape, hidden, shape.num_heads, shape.num_kv_heads)
    # Closest attention size; ties go to more heads (they are the coarse, sensitive unit).
    kv, q = min(
        attention_options(shape),
        key=lambda o: (abs(attention_parameters(shape, hidden, o[0] * o[1], o[0]) / dense_attention - keep),
                       -o[0] * o[1]),
    )
    target_keep = keep * dense_layer_parameters(shape, hidden)
    mlp_budget = target_keep - attention_parameters(shape, hidden, kv * q, kv)
    per_channel = mlp_parameters(shape, hidden, 1)
    channels = round_channels(mlp_budget / per_channel, shape.intermediate_size, mlp_multiple)
    return LayerCounts(kv, q, channels)


def round_channels(channels: float, width: int, multiple: int) -> int:
    if channels >= width:
        return width
    if channels <= 0:
        return 0
    return min(width, max(0, int(round(channels / multiple)) * multiple))


def kept_parameters(geometry: ModelGeometry, counts: Sequence[LayerCounts]) -> list[int]:
    """Prunable parameters every layer keeps with ``counts``."""
    hidden = geometry.hidden_size
    return [attention_parameters(shape, hidden, c.heads, c.kv_heads) + mlp_parameters(shape, hidden, c.channels)
            for shape, c in zip(geometry.layers, counts, strict=True)]


def removed_parameters(geometry: ModelGeometry, counts: Sequence[LayerCounts]) -> int:
    dense = sum(dense_layer_parameters(shape, geometry.hidden_size) for shape in geometry.layers)
    return dense - sum(kept_parameters(geometry, counts))


def counts_from_ratios(
    geometry: ModelGeometry, ratios: Sequence[float], sparsity: float, mlp_multiple: int = 1
) -> list[LayerCounts]:
    """Feasible per-layer counts following ``ratios`` whose total hits ``sparsity`` within one MLP step."""
    if len(ratios) != geometry.num_layers:
        raise PlanError(f"{len(ratios)} ratios for {geometry.num_layers} layers")
    hidden = geometry.hidden_size
    counts = [
        counts_for_ratio(shape, hidden, min(max(r, 0.0), 1.0), mlp_multiple)
        for shape, r in zip(geometry.layers, ratios, strict=True)
    ]
    target = sparsity * sum(dense_layer_parameters(s, hidden) for s in geometry.layers)
    return correct_mlp_widths(geometry, counts, ratios, target, mlp_multiple)


def correct_mlp_widths(
    geometry: ModelGeometry,
    counts: Sequence[LayerCounts],
    ratios: Sequence[float],
    target: float,
    mlp_multiple: int,
    frozen: Collection[int] = (),
) -> list[LayerCounts]:
    """Move MLP widths one step at a time, in the layers that are furthest from their ratio, until the
    removed total is within half a step of ``target``; layers in ``frozen`` are never moved."""
    hidden = geometry.hidden_size
    counts = list(counts)
    while True:
        error = target - removed_parameters(geometry, counts)  # > 0: must remove more
        candidates = []
        for i, (shape, c) in enumerate(zip(geometry.layers, counts, strict=True)):
            if i in frozen:
                continue
            step = _step(c.channels, shape.intermediate_size, mlp_multiple, remove=error > 0)
            if step == 0:
                continue
            gain = mlp_parameters(shape, hidden, abs(step))
            if abs(error) <= gain / 2:
                continue
            dense = dense_layer_parameters(shape, hidden)
            layer_ratio = 1 - (
                attention_parameters(shape, hidden, c.heads, c.kv_heads) + mlp_parameters(shape, hidden, c.channels)
            ) / dense
            slack = (ratios[i] - layer_ratio) if error > 0 else (layer_ratio - ratios[i])
            candidates.append((slack, -i, i, step))
        if not candidates:
            break
        _, _, i, step = max(candidates)
        c = counts[i]
        counts[i] = LayerCounts(c.kv_heads, c.heads_per_group, c.channels + step)
    return counts


def _step(channels: int, width: int, multiple: int, remove: bool) -> int:
    """Signed change of width to the next allowed width in the requested direction (0: none left)."""
    if remove:
        if channels == 0:
            return 0
        lower = (channels - 1) // multiple * multiple
        return lower - channels
    if channels == width:
        return 0
    upper = min(width, (channels // multiple + 1) * multiple)
    return upper - channels


def max_sparsity(geometry: ModelGeometry) -> float:
    """Sparsity with one head per layer and no MLP: more cannot be removed."""
    hidden = geometry.hidden_size
    minimal = [LayerCounts(1, 1, 0) for _ in geometry.layers]
    total = sum(dense_layer_parameters(s, hidden) for s in geometry.layers)
    return removed_parameters(geometry, minimal) / total
