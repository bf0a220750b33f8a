"""MLP widths rounded to a per-device multiple: the default per device, and the cost recorded with the plan."""

from __future__ import annotations

import pytest

from worker.hipp.checkpoint.export import model_card
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.layer_counts import counts_from_ratios
from worker.hipp.pruning.plan import ModelGeometry, PruningPlan
from worker.hipp.pruning.planner import build_plan
from worker.hipp.pruning.rounding import default_mlp_multiple, describe, rounding_cost

# hidden 64, head_dim 8: a query head costs 2*8*64 = 1024 (q and o), a KV group 1024 (k and v), an MLP channel
# 3*64 = 192; a dense layer 8*1024 + 4*1024 + 32*192 = 18432, two layers 36864.
GQA = LayerShape(num_heads=8, num_kv_heads=4, head_dim=8, intermediate_size=32, attention_bias=False,
                 o_bias=False, mlp_bias=False)
TINY = ModelGeometry(family="llava", hidden_size=64, layers=(GQA, GQA), total_parameters=100_000)


@pytest.mark.parametrize(("device", "multiple"), [("cpu", 1), ("cuda", 64), ("cuda:1", 64), ("CUDA:0", 64),
                                                   ("mps", 1)])
def test_default_multiple_is_chosen_per_device(device, multiple):
    assert default_mlp_multiple(device) == multiple


def test_rounding_cost_on_a_tiny_geometry_matches_the_hand_count():
    # 30% uniform: keep 0.7 of a layer. Attention keeps 4 KV groups x 1 head = 8192 (8/12 of 12288, the closest
    # GQA option to 0.7); the MLP gets 0.7*18432 - 8192 = 4710.4 -> 24.53 channels.
    # Multiple 1: 25 channels per layer remove 5440 each, 10880 in all; the budget 0.3*36864 = 11059.2 is 179.2
    # away, more than half a channel, so layer 0 drops one more: 11072 removed, widths 24 and 25.
    # Multiple 8: 24 channels per layer remove 5632 each, 11264 in all; 204.8 over the budget, less than half a
    # step of 8 channels (768), so it stays: widths 24 and 24.
    ratios = [0.3, 0.3]
    counts = counts_from_ratios(TINY, ratios, 0.3, 8)
    assert [c.channels for c in counts] == [24, 24]
    assert [c.channels for c in counts_from_ratios(TINY, ratios, 0.3, 1)] == [24, 25]
    cost = rounding_cost(TINY, ratios, 0.3, counts, 8)
    assert cost.prunable_parameters == 36864
    assert cost.target_removed == 11059
    assert cost.unrounded_removed == 11072
    assert cost.removed == 11264
    assert cost.extra_removed == 192
    assert cost.extra_points == pytest.approx(100 * 192 / 36864)
    assert cost.off_target_points == pytest.approx(100 * (11264 - 11059) / 36864)
    assert cost.shifted_parameters == 192  # layer 1 keeps one channel (192 parameters) fewer
    assert cost.to_dict()["extra_removed"] == 192


def test_rounding_to_one_costs_nothing():
    counts = counts_from_ratios(TINY, [0.2, 0.5], 0.35, 1)
    cost = rounding_cost(TINY, [0.2, 0.5], 0.35, counts, 1)
    assert cost.extra_removed == 0 and cost.shifted_parameters == 0


@pytest.mark.parametrize("multiple", [8, 16, 64])
@pytest.mark.parametrize("allocation", ["uniform", "random"])
def test_rounded_plans_validate_and_carry_their_cost(tiny_gqa, multiple, allocation):
    plan = build_plan(tiny_gqa, 0.4, "magnitude", allocation, mlp_multiple=multiple, seed=1)
    plan.validate()
    widths = [len(lp.channels) for lp in plan.layers]
    assert all(w % multiple == 0 or w == shape.intermediate_size
               for w, shape in zip(widths, plan.geometry.layers, strict=True))
    rounding = plan.meta["rounding"]
    assert rounding["mlp_multiple"] == multiple
    assert rounding["removed"] == plan.removed_parameters()
    assert rounding["prunable_parameters"] == plan.prunable_parameters()
    unrounded = build_plan(tiny_gqa, 0.4, "magnitude", allocation, mlp_multiple=1, seed=1)
    assert rounding["unrounded_removed"] == unrounded.removed_parameters()
    assert rounding["extra_removed"] == plan.removed_parameters() - unrounded.removed_parameters()
    # It travels with the plan: the summary, and a saved plan read back.
    assert plan.summary()["rounding"] == rounding
    again = PruningPlan.from_json(plan.to_json())
    assert again.summary()["rounding"] == rounding


def test_unrounded_plans_report_no_rounding(tiny_gqa):
    plan = build_plan(tiny_gqa, 0.4, "magnitude")
    assert "rounding" not in plan.meta and "rounding" not in plan.summary()
    assert "rounded to multiples" not in model_card("llama", plan, {}, {})


def test_the_model_card_states_the_rounding_cost(tiny_gqa):
    plan = build_plan(tiny_gqa, 0.4, "magnitude", mlp_multiple=16)
    card = model_card("llama", plan, {}, {})
    assert f"- {describe(plan.meta['rounding'])}" in card.splitlines()


def test_the_rounding_line_names_the_multiple_and_the_cost():
    counts = counts_from_ratios(TINY, [0.3, 0.3], 0.3, 8)
    line = describe(rounding_cost(TINY, [0.3, 0.3], 0.3, counts, 8).to_dict())
    assert line.startswith("MLP widths rounded to multiples of 8: +192 parameters removed vs unrounded (+0.521")
    assert "192 moved between layers" in line


def test_the_bench_picks_the_smallest_multiple_within_its_tie():
    from bench.rounding import TIE, pick

    assert pick({1: 1.0, 8: 1.01, 64: 1.2, 128: 1.21}) == 64
    assert pick({1: 1.0, 8: 1.0 - TIE / 2, 64: 0.9}) == 1


def test_the_bench_compares_multiples_sample_by_sample():
    from bench.rounding import paired_ratio

    cells = {1: (100, print, 1, 0.0), 8: (96, print, 1, 0.0)}
    # Samples 2 and 3 are slowed by other work for both widths alike; per channel, 96 runs as fast as 100.
    seconds = {1: [1.0, 5.0, 9.0], 8: [0.96, 4.8, 8.64]}
    assert paired_ratio(cells, seconds, 8) == pytest.approx(1.0)
    assert paired_ratio(cells, {1: [1.0, 1.0, 1.0], 8: [0.48, 0.48, 0.48]}, 8) == pytest.approx(2.0)


def test_the_bench_writes_its_table_and_the_command(tmp_path, monkeypatch, capsys):
    import json
    import os

    from bench import rounding

    monkeypatch.setattr("sys.argv", ["rounding", "--shapes", "230m", "--batches", "1", "--keeps", "0.5",
                                     "--multiples", "1,64", "--group-seconds", "0.01", "--threads", "1",
                                     "--out", str(tmp_path)])
    cores = os.sched_getaffinity(0)
    try:
        rounding.main()
    finally:  # the bench pins this process to its threads' cores; the tests after this one need them all
        os.sched_setaffinity(0, cores)
    data = json.loads((tmp_path / "rounding.json").read_text())
    assert {r["width"] for r in data["results"]} == {1409, 1408}  # 0.5 * 2816 made odd, and rounded to 64
    assert data["command"].startswith("python -m bench.rounding --shapes 230m")
    assert "load_average_before" in data and data["pick"] in (1, 64)
    assert "| 230m | 1 | 64 | 1408 |" in (tmp_path / "rounding.md").read_text()
    assert "reproduce with: python -m bench.rounding" in capsys.readouterr().out


def test_allocators_with_their_own_split_are_charged_against_their_own_unrounded_choice(tiny_gqa):
    from worker.hipp.data.calibration import synthetic_samples
    from worker.hipp.pruning.baselines.flap import build_flap_plan

    samples = synthetic_samples(4, seed=2)
    rounded = build_plan(tiny_gqa, 0.4, "wanda-sp", "wanda-sp", samples=samples, mlp_multiple=8, seed=1)
    unrounded = build_plan(tiny_gqa, 0.4, "wanda-sp", "wanda-sp", samples=samples, mlp_multiple=1, seed=1)
    assert rounded.meta["rounding"]["unrounded_removed"] == unrounded.removed_parameters()
    assert rounded.meta["rounding"]["removed"] == rounded.removed_parameters()
    flap8 = build_flap_plan(tiny_gqa, 0.4, samples, mlp_multiple=8, batch_size=2).plan
    flap1 = build_flap_plan(tiny_gqa, 0.4, samples, mlp_multiple=1, batch_size=2).plan
    assert flap8.meta["rounding"]["unrounded_removed"] == flap1.removed_parameters()
    assert flap8.meta["rounding"]["removed"] == flap8.removed_parameters()
    assert "rounding" not in flap1.meta
