"""Baseline allocators: every one hits its target within one rounding unit with valid (GQA) plans."""

from __future__ import annotations

import pytest

from worker.hipp.data.calibration import synthetic_samples
from worker.hipp.errors import OptionError
from worker.hipp.pruning.allocators import ALLOCATORS, AllocationContext, spread
from worker.hipp.pruning.plan import mlp_parameters
from worker.hipp.pruning.planner import allocation_context, build_plan, score_model


@pytest.fixture(scope="module")
def scored():
    from worker.hipp.models.loading import load_model

    loaded = load_model("tiny-llava")
    samples = synthetic_samples(8, seed=0)
    scoring = score_model(loaded, "wanda-sp", samples, with_activations=True)
    return loaded, samples, scoring


@pytest.mark.parametrize("allocation", sorted(ALLOCATORS))
@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.4, 0.5])
def test_allocator_hits_target_with_valid_plans(scored, allocation, sparsity):
    loaded, samples, scoring = scored
    context = allocation_context(loaded, allocation, scoring, samples, seed=3)
    plan = build_plan(loaded, sparsity, "wanda-sp", allocation, mlp_multiple=8, samples=samples,
                      scoring=scoring, context=context)
    plan.validate()
    unit = mlp_parameters(plan.geometry.layers[0], plan.geometry.hidden_size, 8)
    assert abs(plan.removed_parameters() - sparsity * plan.prunable_parameters()) <= unit / 2
    assert plan.meta["allocation"] == allocation


def test_allocators_are_deterministic_given_a_seed(scored):
    loaded, samples, scoring = scored
    plans = [
        build_plan(loaded, 0.4, "wanda-sp", "random", samples=samples, scoring=scoring, seed=s,
                   context=AllocationContext(scores=scoring.scores, seed=s))
        for s in (1, 1, 2)
    ]
    assert plans[0].fingerprint == plans[1].fingerprint != plans[2].fingerprint


def test_non_uniform_allocators_differ_from_uniform(scored):
    loaded, samples, scoring = scored
    uniform = build_plan(loaded, 0.4, "wanda-sp", "uniform", samples=samples, scoring=scoring)
    for allocation in ("flap", "random"):
        context = allocation_context(loaded, allocation, scoring, samples, seed=5)
        other = build_plan(loaded, 0.4, "wanda-sp", allocation, samples=samples, scoring=scoring, context=context)
        assert other.layer_sparsities() != uniform.layer_sparsities(), allocation


def test_spread_prunes_less_where_signal_is_high():
    ratios = spread(0.3, [0.0, 1.0, 0.5], 0.1)
    assert ratios == pytest.approx([0.4, 0.2, 0.3])
    assert spread(0.3, [2.0, 2.0], 0.1) == [0.3, 0.3]


def test_allocators_that_need_signals_say_so(tiny_gqa):
    from worker.hipp.pruning.allocators import allocate
    from worker.hipp.pruning.plan import geometry_of

    for allocation, needed in (("owl", "outlier"), ("visual", "sensitivity"), ("flap", "scores")):
        with pytest.raises(OptionError, match=needed):
            allocate(geometry_of(tiny_gqa.adapter), 0.3, allocation)


def test_allocators_are_configured_in_their_constructors(tiny_gqa):
    from worker.hipp.pruning.allocators import OWLAllocator, RandomAllocator, UniformAllocator, allocate
    from worker.hipp.pruning.plan import geometry_of

    g = geometry_of(tiny_gqa.adapter)
    signal = AllocationContext(outlier_ratios=[0.1, 0.4, 0.2, 0.3])
    assert OWLAllocator(lam=0.0).layer_ratios(g, 0.3, signal) == UniformAllocator().layer_ratios(g, 0.3, signal)
    assert OWLAllocator(lam=0.1).layer_ratios(g, 0.3, signal) == pytest.approx([0.4, 0.2, 0.3333, 0.2667], abs=1e-4)
    # An allocator object and its registered name (with the context's seed) give the same counts.
    assert allocate(g, 0.3, RandomAllocator(seed=4)) == allocate(g, 0.3, "random", context=AllocationContext(seed=4))
    assert allocate(g, 0.3, RandomAllocator(seed=4)) != allocate(g, 0.3, RandomAllocator(seed=5))
    capped = RandomAllocator(seed=4, max_ratio=0.35).layer_ratios(g, 0.3, AllocationContext())
    assert max(capped) <= 0.35


def test_allocate_uses_the_allocators_own_split():
    from tests.test_rounding import TINY as g
    from worker.hipp.pruning.allocators import Allocator, UniformAllocator, allocate
    from worker.hipp.pruning.layer_counts import LayerCounts, counts_from_ratios

    # Default: ratios through the closest-attention-option rule, as before.
    assert allocate(g, 0.3, UniformAllocator()) == counts_from_ratios(g, [0.3] * g.num_layers, 0.3)

    class Dense(Allocator):
        def layer_counts(self, geometry, sparsity, context, mlp_multiple):
            return [LayerCounts(s.num_kv_heads, s.group_size, s.intermediate_size) for s in geometry.layers]

    assert allocate(g, 0.3, Dense())[0].channels == g.layers[0].intermediate_size
    assert Dense().layer_ratios(g, 0.3, AllocationContext()) == [0.0] * g.num_layers
    with pytest.raises(TypeError):
        type("Nothing", (Allocator,), {})
