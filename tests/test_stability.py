"""SynFlow stability proxy: path mass per unit, retained fraction per layer, and the pre-screen."""

from __future__ import annotations

import pytest
import torch

from worker.hipp.pruning.plan import LayerPlan, PruningPlan, geometry_of
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.stability import StabilityProxy, layer_path_mass


@torch.no_grad()
def test_path_mass_matches_its_definition(tiny_gqa):
    layer = tiny_gqa.adapter.layer(1)
    mass = layer_path_mass(layer)
    k = 5
    expected = (layer.up_proj.weight[k].abs().sum() + layer.gate_proj.weight[k].abs().sum()) * \
        layer.down_proj.weight[:, k].abs().sum()
    assert float(mass.channels[k]) == pytest.approx(float(expected), rel=1e-6)
    d, h = layer.head_dim, 3
    g = h // (layer.num_heads // layer.num_kv_heads)
    v_rows = layer.v_proj.weight[g * d:(g + 1) * d].abs().sum()
    expected_head = v_rows * layer.o_proj.weight[:, h * d:(h + 1) * d].abs().sum()
    assert float(mass.heads[h]) == pytest.approx(float(expected_head), rel=1e-6)


def test_dense_plan_keeps_everything(tiny_gqa):
    proxy = StabilityProxy.from_adapter(tiny_gqa.adapter)
    report = proxy.evaluate(PruningPlan.dense(geometry_of(tiny_gqa.adapter)))
    assert report.rho == pytest.approx([1.0] * 4) and report.score == pytest.approx(1.0) and report.passes


def test_prescreen_rejects_a_plan_that_empties_a_layer(tiny_gqa):
    g = geometry_of(tiny_gqa.adapter)
    layers = [LayerPlan.dense(s) for s in g.layers]
    layers[2] = LayerPlan((0,), (0,), ())
    report = StabilityProxy.from_adapter(tiny_gqa.adapter).evaluate(PruningPlan(g, layers))
    assert report.rho[2] == 0.0 and not report.passes
    assert report.score < 0.05


def test_more_pruning_keeps_less_mass(tiny_gqa):
    proxy = StabilityProxy.from_adapter(tiny_gqa.adapter)
    scores = [proxy.evaluate(build_plan(tiny_gqa, s, "magnitude")).score for s in (0.2, 0.4, 0.6)]
    assert scores[0] > scores[1] > scores[2]
    assert all(0 < s < 1 for s in scores)
    assert torch.isfinite(torch.tensor(scores)).all()
