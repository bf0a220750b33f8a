"""The faithful baselines (``pruning.baselines``) on small hand-computed cases: OWL's mean-centred ratios,
LLM-Pruner's protected layers scaled to the depth, Wanda-sp's equal head/channel ratio and its sequential
scoring, and best-of-K selection with exactly K evaluations."""

from __future__ import annotations

import pytest
import torch

from tests.test_rounding import GQA, TINY
from worker.hipp.errors import OptionError
from worker.hipp.models.adapters.base import LayerShape
from worker.hipp.pruning.allocators import AllocationContext, allocate
from worker.hipp.pruning.baselines.equal_budget import (
    best_of_k,
    llm_pruner_candidates,
    owl_lambda_candidates,
    random_candidates,
)
from worker.hipp.pruning.baselines.llm_pruner import LLMPrunerAllocator, protected_layers
from worker.hipp.pruning.baselines.owl import OWLPaperAllocator, owl_ratios
from worker.hipp.pruning.baselines.wanda_sp import WandaSPAllocator, equal_ratio_shape
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import LayerCounts, removed_parameters
from worker.hipp.pruning.plan import LayerPlan, ModelGeometry, PruningPlan, dense_layer_parameters

# MHA, hidden 64, head_dim 8: a head costs 4*8*64 = 2048 (q, k, v, o), a channel 3*64 = 192; dense layer
# 8*2048 + 32*192 = 22528. Removing a quarter of both heads and channels removes exactly a quarter.
MHA = LayerShape(num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=32, attention_bias=False,
                 o_bias=False, mlp_bias=False)


def geometry(shape: LayerShape, depth: int) -> ModelGeometry:
    return ModelGeometry(family="llava", hidden_size=64, layers=(shape,) * depth, total_parameters=10**7)


def budget(g: ModelGeometry, sparsity: float) -> float:
    return sparsity * sum(dense_layer_parameters(s, g.hidden_size) for s in g.layers)


# --- OWL ---------------------------------------------------------------------------------------------------

def test_owl_ratios_are_scaled_to_two_lambda_and_mean_centred():
    # Outlier ratios 0.1, 0.2, 0.4 -> min-max 0, 1/3, 1 -> x 0.16 = 0, 0.05333, 0.16; mean 0.07111;
    # ratio = 0.5 - (x - mean) = 0.57111, 0.51778, 0.41111 (more outliers, less pruning; mean exactly 0.5).
    ratios = owl_ratios(0.5, [0.1, 0.2, 0.4], lam=0.08)
    assert ratios == pytest.approx([0.5 + 0.64 / 9, 0.5 + 0.64 / 9 - 0.16 / 3, 0.5 + 0.64 / 9 - 0.16])
    assert sum(ratios) / 3 == pytest.approx(0.5)
    assert owl_ratios(0.3, [0.2, 0.2], lam=0.08) == [0.3, 0.3]
    # Two layers: the spread is symmetric, [s - lambda, s + lambda].
    assert owl_ratios(0.4, [0.0, 1.0], lam=0.1) == pytest.approx([0.5, 0.3])


def test_owl_allocator_hits_the_budget_and_protects_outlier_layers():
    g = geometry(MHA, 2)
    counts = allocate(g, 0.4, OWLPaperAllocator(0.08), context=AllocationContext(outlier_ratios=[0.01, 0.05]))
    assert abs(removed_parameters(g, counts) - budget(g, 0.4)) <= 192 / 2
    assert counts[1].heads >= counts[0].heads and counts[1].channels > counts[0].channels
    with pytest.raises(OptionError):
        allocate(g, 0.4, OWLPaperAllocator())


# --- LLM-Pruner --------------------------------------------------------------------------------------------

def test_llm_pruner_protection_scales_with_depth():
    assert protected_layers(32) == (4, 2)  # LLaMA-7B: layers 4-29 pruned
    assert protected_layers(6) == (1, 0)  # round(0.75), round(0.375)
    assert protected_layers(16) == (2, 1)
    assert protected_layers(6, first=2, last=1) == (2, 1)
    with pytest.raises(OptionError):
        protected_layers(4, first=2, last=2)
    assert (LLMPrunerAllocator.protecting(3).first, LLMPrunerAllocator.protecting(3).last) == (2, 1)


def test_llm_pruner_keeps_the_protected_layers_dense_and_prunes_the_rest_uniformly():
    g = geometry(MHA, 6)
    # 6 equal layers, layer 0 dense: the other five carry 0.3 * 6 / 5 = 0.36 each.
    ratios = LLMPrunerAllocator().layer_ratios(g, 0.3, AllocationContext())
    assert ratios == pytest.approx([0.0] + [0.36] * 5)
    counts = allocate(g, 0.3, LLMPrunerAllocator())
    assert counts[0] == LayerCounts(8, 1, 32)
    assert abs(removed_parameters(g, counts) - budget(g, 0.3)) <= 192 / 2
    g32 = geometry(MHA, 32)
    counts = allocate(g32, 0.2, LLMPrunerAllocator())
    dense = LayerCounts(8, 1, 32)
    assert counts[:4] == [dense] * 4 and counts[-2:] == [dense] * 2 and all(c != dense for c in counts[4:30])


# --- Wanda-sp ----------------------------------------------------------------------------------------------

def test_wanda_sp_removes_heads_and_channels_at_the_same_ratio():
    g = geometry(MHA, 2)
    # A quarter: int(0.25 * 8) = 2 heads and int(0.25 * 32) = 8 channels go from every layer, exactly the budget.
    assert allocate(g, 0.25, WandaSPAllocator()) == [LayerCounts(6, 1, 24)] * 2
    assert allocate(g, 0.5, WandaSPAllocator()) == [LayerCounts(4, 1, 16)] * 2


def test_wanda_sp_gqa_shape_is_chosen_by_the_ranking():
    # Half of 8 query heads: 4 KV x 1 or 2 KV x 2; the ranking keeps whichever holds more score.
    grouped = LayerScores(heads=torch.tensor([9.0, 9, 8, 8, 1, 1, 1, 1]), channels=torch.ones(32))
    spread = LayerScores(heads=torch.tensor([9.0, 1, 9, 1, 9, 1, 9, 1]), channels=torch.ones(32))
    assert equal_ratio_shape(GQA, 0.5, grouped) == (2, 2)  # keeps 34 vs 19
    assert equal_ratio_shape(GQA, 0.5, spread) == (4, 1)  # keeps 36 vs 20
    counts = allocate(TINY, 0.4, WandaSPAllocator(), context=AllocationContext(scores=[grouped, grouped]))
    assert abs(removed_parameters(TINY, counts) - budget(TINY, 0.4)) <= 192 / 2


@pytest.fixture(scope="module")
def tiny():
    from worker.hipp.data.calibration import synthetic_samples
    from worker.hipp.models.loading import load_model

    return load_model("tiny-llava"), synthetic_samples(8, seed=0)


def test_sequential_scoring_changes_later_layers_only(tiny):
    from worker.hipp.pruning.plan import geometry_of
    from worker.hipp.pruning.planner import build_plan, score_model, select_sequentially

    loaded, samples = tiny
    g = geometry_of(loaded.adapter)
    one_shot = score_model(loaded, "wanda-sp", samples).scores
    counts = allocate(g, 0.5, WandaSPAllocator(), context=AllocationContext(scores=one_shot))
    layers, scores = select_sequentially(loaded, g, counts, "wanda-sp", samples)
    assert torch.allclose(scores[0].channels, one_shot[0].channels)  # nothing before layer 0 is pruned
    assert not torch.allclose(scores[1].channels, one_shot[1].channels)  # layer 0 pruned changes layer 1's input
    plan = build_plan(loaded, 0.5, "wanda-sp", "wanda-sp", samples=samples)
    assert plan.meta["sequential"] is True and plan.layers == layers


# --- best of K ---------------------------------------------------------------------------------------------

def test_best_of_k_picks_the_argmax_with_exactly_k_evaluations():
    values = [0.3, 0.9, 0.1, 0.9, 0.5, 0.2, 0.4, 0.8, 0.6]
    calls: list[int] = []

    def build(allocator):  # type: ignore[no-untyped-def]
        return PruningPlan(TINY, [LayerPlan.dense(s) for s in TINY.layers], meta={"seed": allocator.seed})

    def score(plan):  # type: ignore[no-untyped-def]
        calls.append(plan.meta["seed"])
        return values[plan.meta["seed"] - 10]

    selection = best_of_k(random_candidates(9, seed=10), build, score)
    assert calls == list(range(10, 19)) and selection.evaluations == 9
    assert selection.label == "random seed 11" and selection.score == 0.9  # first of the tied best
    assert selection.plan.meta["seed"] == 11


def test_hyperparameter_candidates():
    lams = [a.lam for _, a in owl_lambda_candidates(9)]
    assert len(lams) == 9 and lams[0] == pytest.approx(0.02) and lams[-1] == pytest.approx(0.2)
    assert [label for label, _ in llm_pruner_candidates(9, 6)] == [f"{n} protected" for n in range(6)]


# --- the bench's monotonicity flag -------------------------------------------------------------------------

def test_bench_flags_a_pope_rise_beyond_two_standard_errors():
    from bench.baselines import monotonicity_flags, pope_se

    # Three splits with SE 0.03 each: the mean's SE is sqrt(3 * 0.0009) / 3 = 0.01732.
    assert pope_se({"pope": {s: {"balanced_accuracy_se": 0.03} for s in "abc"}}) == pytest.approx(0.0173205)

    def cell(name: str, s: float, pope: float) -> dict:  # type: ignore[type-arg]
        return {"baseline": name, "requested": s, "pope_bacc": pope, "pope_se": 0.01}

    # 2 SE of a difference of two cells with SE 0.01: 2 * sqrt(2) * 0.01 = 0.0283.
    rows = [cell("a", 0.3, 0.70), cell("a", 0.2, 0.90), cell("a", 0.4, 0.75),  # +0.05 from 30 to 40%: flagged
            cell("b", 0.2, 0.90), cell("b", 0.3, 0.92), cell("b", 0.4, 0.80)]  # +0.02: within noise
    flags = monotonicity_flags(rows)
    assert list(flags) == ["a"] and flags["a"][0].startswith("30->40%: +0.050")


def test_build_plan_takes_an_allocator_with_its_settings(tiny):
    from worker.hipp.pruning.planner import build_plan

    loaded, samples = tiny
    plan = build_plan(loaded, 0.3, "wanda-sp", LLMPrunerAllocator(first=1, last=0), samples=samples)
    assert plan.meta["allocation"] == "llm-pruner" and plan.meta["allocator"] == {"first": 1, "last": 0}
    assert plan.layer_sparsities()[0] == 0.0


def test_best_of_k_skips_candidates_that_cannot_reach_the_sparsity():
    calls: list[str] = []

    def build(allocator):  # type: ignore[no-untyped-def]
        allocator.layer_ratios(geometry(MHA, 6), 0.5, AllocationContext())  # 5 of 6 protected: 3.0 of one layer
        protected = allocator.first + allocator.last
        return PruningPlan(TINY, [LayerPlan.dense(s) for s in TINY.layers], meta={"p": protected})

    def score(plan):  # type: ignore[no-untyped-def]
        calls.append(plan.meta["p"])
        return float(plan.meta["p"])

    selection = best_of_k(llm_pruner_candidates(9, 6), build, score)
    # Protected 0-2 leave 0.5 * 6 / (6 - n) < 1 of the rest; 3, 4 and 5 protected cannot reach 50%.
    assert selection.evaluations == 3 and selection.infeasible == ("3 protected", "4 protected", "5 protected")
    assert selection.label == "2 protected"
    with pytest.raises(OptionError):
        best_of_k(llm_pruner_candidates(9, 6)[3:], build, score)
