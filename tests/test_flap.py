"""FLAP (``pruning/baselines/flap.py``, ``pruning/bias_compensation.py``): WIFV, per-layer standardization and
the global ranking on hand-computed cases; bias compensation equal to mean replacement; the compensated export
reloads in a plain transformers process with equal logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from worker.hipp.checkpoint.export import export_pruned, export_zero_padded
from worker.hipp.errors import OptionError
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.allocators import ALLOCATORS, AllocationContext
from worker.hipp.pruning.baselines.flap import (
    FLAP,
    FlapScores,
    build_flap_plan,
    channel_statistics,
    flap_layer_scores,
    global_search,
    prune_flap,
    standardize,
    wifv,
)
from worker.hipp.pruning.bias_compensation import BiasCompensation, compensation_bias, fold_bias, mean_replacement
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import LayerCounts
from worker.hipp.pruning.plan import ModelGeometry, PruningPlan
from worker.hipp.pruning.surgery import apply_plan


def test_wifv_is_sample_variance_times_squared_column_norm():
    # Three tokens, three channels: variances 1, 3, 0 (n - 1 = 2); column norms^2 5, 5, 25.
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 3.0, 2.0]])
    stats = channel_statistics(x)
    assert stats.tokens == 3
    assert torch.allclose(stats.mean, torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(stats.variance, torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64))
    weight = torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 5.0]])
    assert torch.allclose(wifv(stats.variance, weight), torch.tensor([5.0, 15.0, 0.0], dtype=torch.float64))


def test_standardization_is_per_layer_and_heads_average_their_squared_channels():
    assert torch.allclose(standardize(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]).double())
    # o_proj WIFV [1, 1, 2, 0] (2 heads of 2 dims): squared [1, 1, 4, 0], mean 1.5, std sqrt(3).
    scores = flap_layer_scores(torch.tensor([1.0, 1.0, 2.0, 0.0]), torch.tensor([1.0, 2.0, 3.0]), head_dim=2)
    r3 = math.sqrt(3.0)
    assert torch.allclose(scores.heads, torch.tensor([-0.5 / r3, 0.5 / r3], dtype=torch.float64))
    assert torch.allclose(scores.channels, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    # Per layer: a layer whose metrics are 100x another's gets the same scores.
    loud = flap_layer_scores(torch.tensor([10.0, 10.0, 20.0, 0.0]), torch.tensor([100.0, 200.0, 300.0]), 2)
    assert torch.allclose(loud.heads, scores.heads) and torch.allclose(loud.channels, scores.channels)
    assert torch.equal(standardize(torch.ones(4)), torch.zeros(4, dtype=torch.float64))


def _tiny_geometry() -> ModelGeometry:
    # hidden 4, 2 MHA heads of dim 2, 4 MLP channels: a head costs 32 parameters, a channel 12, a layer 112.
    shape = LayerShape(num_heads=2, num_kv_heads=2, head_dim=2, intermediate_size=4, attention_bias=False,
                       o_bias=False, mlp_bias=False)
    return ModelGeometry("llava", 4, (shape, shape), total_parameters=1000)


SCORES = [
    FlapScores(heads=torch.tensor([2.0, -1.0]), channels=torch.tensor([1.0, 0.5, 0.4, 0.3])),
    FlapScores(heads=torch.tensor([1.5, 1.2]), channels=torch.tensor([-2.0, -1.5, -1.2, -0.9])),
]


def test_global_ranking_decides_heads_versus_channels_per_layer():
    # Ranked: L0h0 2.0, L1h0 1.5, L1h1 1.2, L0c0 1.0, L0c1 .5, ... ; kept parameters 32, 64, 96, 108, 120, ...
    # 50% of 224 keeps 112: the prefix of 4 units (108) is closest.
    plans = global_search(_tiny_geometry(), SCORES, 0.5)
    assert (plans[0].heads, plans[0].kv_heads, plans[0].channels) == ((0,), (0,), (0,))
    assert (plans[1].heads, plans[1].kv_heads, plans[1].channels) == ((0, 1), (0, 1), ())
    assert PruningPlan(_tiny_geometry(), plans).removed_parameters() == 224 - 108
    # 30% keeps 156.8: 8 units (156); layer 1's best channel (index 3) is the 8th.
    plans = global_search(_tiny_geometry(), SCORES, 0.3)
    assert plans[0].channels == (0, 1, 2, 3) and plans[0].heads == (0,)
    assert plans[1].channels == (3,) and plans[1].heads == (0, 1)


def test_flap_allocator_counts_follow_the_ranking_and_it_is_registered():
    allocator = ALLOCATORS.get("flap-paper")()
    assert isinstance(allocator, FLAP)
    context = AllocationContext(scores=SCORES)
    counts = allocator.layer_counts(_tiny_geometry(), 0.5, context, 1)
    assert counts == [LayerCounts(1, 1, 1), LayerCounts(2, 1, 0)]
    ratios = allocator.layer_ratios(_tiny_geometry(), 0.5, context)
    assert ratios == pytest.approx([1 - 44 / 112, 1 - 64 / 112])
    with pytest.raises(OptionError):
        allocator.layer_counts(_tiny_geometry(), 0.5, AllocationContext(), 1)
    raw = [LayerScores(s.heads, s.channels) for s in SCORES]  # e.g. wanda-sp's: not comparable across layers
    with pytest.raises(OptionError, match="not another criterion"):
        allocator.layer_counts(_tiny_geometry(), 0.5, AllocationContext(scores=raw), 1)


def test_gqa_heads_are_ranked_as_whole_kv_groups_and_a_layer_keeps_one():
    shape = LayerShape(num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=4, attention_bias=False,
                       o_bias=False, mlp_bias=False)
    geometry = ModelGeometry("llava", 4, (shape, shape), total_parameters=1000)
    # Layer 0's groups score mean(3, -1) = 1 and mean(0, 0) = 0; layer 1's heads all rank last.
    scores = [LayerScores(torch.tensor([3.0, -1.0, 0.0, 0.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])),
              LayerScores(torch.full((4,), -5.0), torch.tensor([1.5, 1.5, 1.5, 1.5]))]
    plans = global_search(geometry, scores, 0.45)
    assert plans[0].kv_heads == (0,) and plans[0].heads == (0, 1)
    assert plans[1].kv_heads == (0,) and plans[1].heads == (0, 1)  # the guard: its best group stays
    PruningPlan(geometry, plans).validate()


def test_compensation_bias_and_fold_on_a_hand_case():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean = torch.tensor([1.0, 10.0, 100.0])
    assert torch.equal(compensation_bias(weight, mean, torch.tensor([1, 2])),
                       torch.tensor([320.0, 650.0], dtype=torch.float64))
    linear = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(torch.tensor([1.0, -1.0]))
    fold_bias(linear, mean, [0])
    assert torch.equal(linear.bias.data, torch.tensor([321.0, 649.0]))
    plain = nn.Linear(3, 2, bias=False)
    fold_bias(plain, mean, [0, 1, 2])  # nothing removed: no bias appears
    assert plain.bias is None


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_bias", "tiny_qwen25"])
def test_compensated_pruning_equals_mean_replacement(request, fixture, batch_for, tmp_path):
    loaded = request.getfixturevalue(fixture)
    batch = batch_for(loaded)
    from worker.hipp.data.calibration import synthetic_samples

    result = build_flap_plan(loaded, 0.5, synthetic_samples(6, seed=3), batch_size=3)
    assert abs(result.plan.sparsity - 0.5) < 0.02
    assert result.plan.meta["allocation"] == "flap-paper" and result.plan.meta["bias_compensation"] is True
    with torch.no_grad(), mean_replacement(loaded.adapter, result.plan, result.compensation):
        reference = loaded.model(**batch).logits
    with torch.no_grad():
        dense = loaded.model(**batch).logits
    result.compensation.save(tmp_path / "means.safetensors")  # the replay path: plan JSON + saved means
    apply_plan(loaded.adapter, PruningPlan.from_json(result.plan.to_json()),
               BiasCompensation.load(tmp_path / "means.safetensors"))
    with torch.no_grad():
        pruned = loaded.model(**batch).logits
    assert (pruned - reference).abs().max().item() <= 1e-5
    assert (pruned - dense).abs().max().item() > 1e-3  # the check is not vacuous: pruning changed the model
    for layer, lp, shape in zip(loaded.adapter.layers(), result.plan.layers, result.plan.geometry.layers,
                                strict=True):
        if len(lp.heads) < shape.num_heads:
            assert layer.o_proj.bias is not None
        if len(lp.channels) < shape.intermediate_size:
            assert layer.down_proj.bias is not None


RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(2)
    from transformers import AutoModelForImageTextToText
    path = sys.argv[1]
    model, info = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True,
                                                              output_loading_info=True)
    batch = torch.load(path + "/../batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, path + "/../reloaded.pt")
    print(json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))
    """
)


def test_compensated_export_reloads_in_plain_transformers_with_equal_logits(tiny_gqa, tmp_path, batch_for):
    from worker.hipp.data.calibration import synthetic_samples
    from worker.hipp.models.loading import load_model

    batch = batch_for(tiny_gqa)
    result = prune_flap(tiny_gqa, 0.4, synthetic_samples(6, seed=3), batch_size=3)
    with torch.no_grad():
        expected = tiny_gqa.model(**batch).logits
    out = tmp_path / "export"
    export_pruned(tiny_gqa.model, tiny_gqa.processor, tiny_gqa.adapter, out, plan=result.plan)
    layers = json.loads((out / "config.json").read_text())["hipp_layers"]
    assert [spec["o_proj_bias"] for spec in layers] == [len(lp.heads) < 8 for lp in result.plan.layers]
    assert [spec["down_proj_bias"] for spec in layers] == [len(lp.channels) < 128 for lp in result.plan.layers]
    assert "bias compensation (FLAP)" in (out / "README.md").read_text()
    torch.save(dict(batch), tmp_path / "batch.pt")
    # -I: isolated mode, so only torch + transformers (and the export's own remote code) are used.
    run = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(out)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert (torch.load(tmp_path / "reloaded.pt") - expected).abs().max().item() <= 1e-5
    again = load_model(str(out))  # and through the engine
    with torch.no_grad():
        assert (again.model(**batch).logits - expected).abs().max().item() <= 1e-5
    with pytest.raises(OptionError, match="bias compensation"):
        export_zero_padded(tiny_gqa.model, tiny_gqa.processor, tiny_gqa.adapter, result.plan, tmp_path / "zp")
