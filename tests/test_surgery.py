"""Masks and surgery apply the same plan: same logits; surgery really shrinks the modules. One test per
behaviour, parameterized over the model families (LLaVA with GQA, MHA and o/MLP biases; Qwen2.5-VL and Qwen2-VL
with q/k/v biases and mRoPE)."""

from __future__ import annotations

import pytest

from tests.surgery_checks import assert_mask_equals_surgery, every_other_kv_group, first_layer_plan, half_of_each_group
from worker.hipp.data.calibration import synthetic_samples
from worker.hipp.errors import PlanError
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.plan import LayerPlan, PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.surgery import apply_plan

FAMILIES = ["tiny_gqa", "tiny_mha", "tiny_bias", "tiny_qwen25", "tiny_qwen2"]
GQA = ["tiny_gqa", "tiny_qwen25"]  # query heads grouped over fewer KV heads


def make_plan(loaded, sparsity: float, criterion: str) -> PruningPlan:
    # Eight calibration prompts are plenty for these 2-4-layer models and keep the suite fast.
    return build_plan(loaded, sparsity, criterion, samples=synthetic_samples(8, seed=1))


@pytest.mark.parametrize("fixture", FAMILIES)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda-sp"])
def test_mask_and_surgery_give_same_logits(request, fixture, criterion, batch_for):
    loaded = request.getfixturevalue(fixture)
    plan = make_plan(loaded, 0.4, criterion)
    assert_mask_equals_surgery(loaded, plan, batch_for(loaded))
    for layer, lp in zip(loaded.adapter.layers(), plan.layers, strict=True):
        assert layer.num_heads == len(lp.heads)
        assert layer.num_kv_heads == len(lp.kv_heads)
        assert layer.intermediate_size == len(lp.channels)
        assert layer.attention.num_key_value_groups == len(lp.heads) // len(lp.kv_heads)
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            assert proj.bias is None or proj.bias.shape == (proj.out_features,)
    assert loaded.adapter.total_parameters() == plan.geometry.total_parameters - plan.removed_parameters()


@pytest.mark.parametrize("fixture", GQA)
def test_whole_kv_groups_removed(request, fixture, batch_for):
    loaded = request.getfixturevalue(fixture)
    shape: LayerShape = loaded.adapter.layer_shapes()[0]
    layer0 = every_other_kv_group(shape)
    assert_mask_equals_surgery(loaded, first_layer_plan(loaded, layer0), batch_for(loaded))
    layer = loaded.adapter.layer(0)
    assert (layer.num_heads, layer.num_kv_heads) == (len(layer0.heads), len(layer0.kv_heads))
    assert layer.attention.num_key_value_groups == shape.group_size
    assert layer.v_proj.out_features == len(layer0.kv_heads) * layer.head_dim
    assert layer.v_proj.bias is None or layer.v_proj.bias.shape == (layer.v_proj.out_features,)


@pytest.mark.parametrize("fixture", GQA)
def test_query_heads_pruned_inside_every_kv_group(request, fixture, batch_for):
    loaded = request.getfixturevalue(fixture)
    shape: LayerShape = loaded.adapter.layer_shapes()[0]
    layer0 = half_of_each_group(shape)
    assert_mask_equals_surgery(loaded, first_layer_plan(loaded, layer0), batch_for(loaded))
    layer = loaded.adapter.layer(0)
    assert (layer.num_heads, layer.num_kv_heads) == (shape.num_heads // 2, shape.num_kv_heads)
    assert layer.attention.num_key_value_groups == shape.group_size // 2
    assert layer.k_proj.out_features == shape.num_kv_heads * layer.head_dim
    assert layer.intermediate_size == len(layer0.channels)


@pytest.mark.parametrize("fixture", GQA)
def test_unequal_query_heads_per_group_are_refused(request, fixture):
    loaded = request.getfixturevalue(fixture)
    shape: LayerShape = loaded.adapter.layer_shapes()[0]
    # Group 0 keeps all its query heads, group 1 one fewer.
    heads = tuple(range(2 * shape.group_size - 1))
    with pytest.raises(PlanError, match="same number of query heads"):
        first_layer_plan(loaded, LayerPlan(heads, (0, 1), (0, 1))).validate()


@pytest.mark.parametrize("fixture", GQA)
def test_plans_keep_gqa_groups_valid(request, fixture):
    loaded = request.getfixturevalue(fixture)
    group = loaded.adapter.layer_shapes()[0].group_size
    for lp in make_plan(loaded, 0.6, "magnitude").layers:
        per_group = {sum(1 for h in lp.heads if h // group == g) for g in lp.kv_heads}
        assert len(per_group) == 1 and lp.kv_heads


def test_layer_with_all_mlp_channels_removed(tiny_mha, batch_for):
    plan = first_layer_plan(tiny_mha, LayerPlan((0, 5), (0, 5), ()))
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
