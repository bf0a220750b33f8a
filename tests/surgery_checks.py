"""Checks shared by the surgery tests of every model family: masks and surgery give the same logits, and
single-layer plans built from a layer's shape (not from one family's head counts)."""

from __future__ import annotations

import torch

from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.models.loading import LoadedModel
from worker.hipp.pruning.masking import apply_masks
from worker.hipp.pruning.plan import LayerPlan, PruningPlan, geometry_of
from worker.hipp.pruning.surgery import apply_plan


def logits(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**inputs).logits


def assert_mask_equals_surgery(loaded: LoadedModel, plan: PruningPlan, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masks (then removed), surgery: same logits; the plan really changes the model. Returns the sliced logits."""
    dense = logits(loaded, inputs)
    with apply_masks(loaded.adapter, plan):
        masked = logits(loaded, inputs)
    assert torch.equal(logits(loaded, inputs), dense), "masks must be fully removed on exit"
    apply_plan(loaded.adapter, plan)
    sliced = logits(loaded, inputs)
    assert (masked - sliced).abs().max().item() <= 1e-5
    assert (dense - sliced).abs().max().item() > 1e-3, "the plan must change the model"
    return sliced


def first_layer_plan(loaded: LoadedModel, layer0: LayerPlan) -> PruningPlan:
    """``layer0`` in the first layer, every other layer dense."""
    g = geometry_of(loaded.adapter)
    return PruningPlan(g, [layer0] + [LayerPlan.dense(s) for s in g.layers[1:]])


def every_other_kv_group(shape: LayerShape) -> LayerPlan:
    """Whole KV groups removed: the odd KV heads stay with all their query heads; the MLP stays whole."""
    kv = tuple(range(1, shape.num_kv_heads, 2))
    heads = tuple(h for g in kv for h in range(g * shape.group_size, (g + 1) * shape.group_size))
    return LayerPlan(heads, kv, tuple(range(shape.intermediate_size)))


def half_of_each_group(shape: LayerShape) -> LayerPlan:
    """Every KV group keeps its second half of query heads (one head per group when groups are pairs) and
    every other MLP channel."""
    half = shape.group_size // 2
    heads = tuple(h for g in range(shape.num_kv_heads)
                  for h in range(g * shape.group_size + half, (g + 1) * shape.group_size))
    return LayerPlan(heads, tuple(range(shape.num_kv_heads)), tuple(range(0, shape.intermediate_size, 2)))
