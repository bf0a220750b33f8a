"""Pruning plans: validation, serialization, fingerprints and parameter accounting."""

from __future__ import annotations

import json

import pytest

from worker.hipp.errors import PlanError
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.plan import LayerPlan, ModelGeometry, PruningPlan

GQA = LayerShape(num_heads=8, num_kv_heads=4, head_dim=8, intermediate_size=32, attention_bias=False,
                 o_bias=False, mlp_bias=False)


def geometry(layers: int = 2) -> ModelGeometry:
    return ModelGeometry(family="llava", hidden_size=64, layers=(GQA,) * layers, total_parameters=200_000)


def plan_with(layer: LayerPlan, mlp_multiple: int = 1) -> PruningPlan:
    g = geometry()
    return PruningPlan(g, [layer, LayerPlan.dense(GQA)], mlp_multiple=mlp_multiple)


def test_dense_plan_is_valid_and_removes_nothing():
    plan = PruningPlan.dense(geometry())
    plan.validate()
    assert plan.sparsity == 0.0
    assert plan.removed_parameters() == 0


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (LayerPlan((), (), tuple(range(32))), "keeps no attention head"),
        (LayerPlan((0, 1, 2), (0, 1), tuple(range(32))), "same number of query heads"),
        (LayerPlan((0, 1), (0, 1), tuple(range(32))), "kept KV heads"),
        (LayerPlan((1, 0), (0,), tuple(range(32))), "sorted and unique"),
        (LayerPlan((0, 1), (0,), (0, 40)), r"must lie in \[0, 32\)"),
        (LayerPlan((0, 1), (0,), tuple(range(10))), "multiple of 8"),
    ],
)
def test_invalid_layers_are_rejected_with_the_reason(layer, message):
    with pytest.raises(PlanError, match=message):
        plan_with(layer, mlp_multiple=8).validate()


def test_layer_count_mismatch_is_rejected():
    plan = PruningPlan(geometry(), [LayerPlan.dense(GQA)])
    with pytest.raises(PlanError, match="plan has 1 layers, the model has 2"):
        plan.validate()


def test_whole_kv_group_and_empty_mlp_are_valid():
    plan = plan_with(LayerPlan((2, 3, 6, 7), (1, 3), ()), mlp_multiple=8)
    plan.validate()
    assert plan.layers[0].head_order(GQA) == [2, 3, 6, 7]


def test_accounting_counts_heads_groups_and_channels():
    # Remove KV group 0 (heads 0,1) and 16 channels from layer 0.
    plan = plan_with(LayerPlan((2, 3, 4, 5, 6, 7), (1, 2, 3), tuple(range(16))))
    hidden, d = 64, 8
    expected = 2 * 2 * d * hidden + 2 * 1 * d * hidden + 3 * 16 * hidden
    assert plan.removed_parameters() == expected
    assert plan.sparsity == pytest.approx(expected / plan.prunable_parameters())
    assert plan.model_fraction_removed == pytest.approx(expected / 200_000)
    assert plan.decoder_flops_per_token() == plan.dense_decoder_flops_per_token() - 2 * expected


def test_json_round_trip_keeps_plan_and_fingerprint():
    plan = plan_with(LayerPlan((0, 1, 4, 5), (0, 2), (0, 1, 2, 5, 6, 30)))
    plan.meta["criterion"] = "wanda-sp"
    again = PruningPlan.from_json(plan.to_json())
    assert again.layers == plan.layers
    assert again.fingerprint == plan.fingerprint
    assert again.meta == {"criterion": "wanda-sp"}
    # channels are stored as runs, not one int each
    assert json.loads(plan.to_json())["layers"][0]["channels"] == [[0, 3], [5, 7], [30, 31]]


def test_fingerprint_changes_with_kept_units_not_meta():
    a = plan_with(LayerPlan((0, 1, 4, 5), (0, 2), tuple(range(32))))
    b = plan_with(LayerPlan((0, 1, 6, 7), (0, 3), tuple(range(32))))
    assert a.fingerprint != b.fingerprint
    a.meta["note"] = "x"
    assert a.fingerprint == plan_with(LayerPlan((0, 1, 4, 5), (0, 2), tuple(range(32)))).fingerprint


def test_tampered_plan_file_is_refused():
    data = json.loads(plan_with(LayerPlan((0, 1, 4, 5), (0, 2), tuple(range(32)))).to_json())
    data["layers"][0]["heads"] = [0, 1, 6, 7]
    data["layers"][0]["kv_heads"] = [0, 3]
    with pytest.raises(PlanError, match="fingerprint does not match"):
        PruningPlan.from_dict(data)
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.from_json("{nope")
    with pytest.raises(PlanError, match="format"):
        PruningPlan.from_dict({"layers": []})
