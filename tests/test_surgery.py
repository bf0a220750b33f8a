"""Masks and surgery apply the same plan: same logits; surgery really shrinks the modules."""

from __future__ import annotations

import pytest
import torch

from worker.hipp.errors import PlanError
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.masking import apply_masks
from worker.hipp.pruning.plan import LayerPlan, PruningPlan, geometry_of
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan


def logits(loaded, batch):
    with torch.no_grad():
        return loaded.model(**batch).logits


def assert_mask_equals_surgery(loaded, plan, batch):
    dense = logits(loaded, batch)
    with apply_masks(loaded.adapter, plan):
        masked = logits(loaded, batch)
    assert torch.equal(logits(loaded, batch), dense), "masks must be fully removed on exit"
    apply_plan(loaded.adapter, plan)
    sliced = logits(loaded, batch)
    assert (masked - sliced).abs().max().item() <= 1e-5
    assert (dense - sliced).abs().max().item() > 1e-3, "the plan must change the model"
    return sliced


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha", "tiny_bias"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda-sp"])
def test_mask_and_surgery_give_same_logits(request, fixture, criterion, batch_for):
    loaded = request.getfixturevalue(fixture)
    batch = batch_for(loaded)
    plan = build_plan(loaded, 0.4, criterion)
    assert_mask_equals_surgery(loaded, plan, batch)
    for layer, lp in zip(loaded.adapter.layers(), plan.layers, strict=True):
        assert layer.num_heads == len(lp.heads)
        assert layer.num_kv_heads == len(lp.kv_heads)
        assert layer.intermediate_size == len(lp.channels)
        assert layer.attention.num_key_value_groups == len(lp.heads) // len(lp.kv_heads)
    assert loaded.adapter.total_parameters() == plan.geometry.total_parameters - plan.removed_parameters()


def custom_plan(loaded, layer0: LayerPlan) -> PruningPlan:
    g = geometry_of(loaded.adapter)
    return PruningPlan(g, [layer0] + [LayerPlan.dense(s) for s in g.layers[1:]])


def test_whole_kv_group_removed(tiny_gqa, batch_for):
    # 8 query heads over 4 KV heads: drop KV groups 0 and 2 entirely.
    shape: LayerShape = tiny_gqa.adapter.layer_shapes()[0]
    plan = custom_plan(tiny_gqa, LayerPlan((2, 3, 6, 7), (1, 3), tuple(range(shape.intermediate_size))))
    assert_mask_equals_surgery(tiny_gqa, plan, batch_for(tiny_gqa))
    layer = tiny_gqa.adapter.layer(0)
    assert (layer.num_heads, layer.num_kv_heads) == (4, 2)


def test_equal_query_heads_removed_per_group(tiny_gqa, batch_for):
    # Keep one query head in every KV group (the second of groups 0,1 and the first of groups 2,3).
    shape = tiny_gqa.adapter.layer_shapes()[0]
    plan = custom_plan(tiny_gqa, LayerPlan((1, 3, 4, 6), (0, 1, 2, 3), tuple(range(shape.intermediate_size))))
    assert_mask_equals_surgery(tiny_gqa, plan, batch_for(tiny_gqa))
    layer = tiny_gqa.adapter.layer(0)
    assert (layer.num_heads, layer.num_kv_heads, layer.attention.num_key_value_groups) == (4, 4, 1)


def test_layer_with_all_mlp_channels_removed(tiny_mha, batch_for):
    plan = custom_plan(tiny_mha, LayerPlan((0, 5), (0, 5), ()))
    assert_mask_equals_surgery(tiny_mha, plan, batch_for(tiny_mha))
    assert tiny_mha.adapter.layer(0).down_proj.in_features == 0


def test_surgery_refuses_a_plan_for_another_shape(tiny_gqa, tiny_mha):
    plan = build_plan(tiny_mha, 0.3, "magnitude")
    with pytest.raises(PlanError, match="another shape"):
        apply_plan(tiny_gqa.adapter, plan)


def test_plans_are_deterministic(tiny_gqa):
    a = build_plan(tiny_gqa, 0.3, "wanda-sp", seed=1)
    b = build_plan(tiny_gqa, 0.3, "wanda-sp", seed=1)
    assert a.fingerprint == b.fingerprint
