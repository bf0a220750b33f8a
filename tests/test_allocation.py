"""Allocation: target sparsity -> feasible per-layer counts that hit the budget."""

from __future__ import annotations

import pytest

from worker.hipp.errors import OptionError
from worker.hipp.pruning.allocators import allocate
from worker.hipp.pruning.layer_counts import counts_from_ratios, max_sparsity, removed_parameters
from worker.hipp.pruning.plan import dense_layer_parameters, geometry_of, mlp_parameters


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("multiple", [1, 8])
def test_uniform_hits_target_within_one_rounding_unit(tiny_gqa, sparsity, multiple):
    g = geometry_of(tiny_gqa.adapter)
    counts = allocate(g, sparsity, "uniform", mlp_multiple=multiple)
    budget = sparsity * sum(dense_layer_parameters(s, g.hidden_size) for s in g.layers)
    unit = mlp_parameters(g.layers[0], g.hidden_size, multiple)
    assert abs(removed_parameters(g, counts) - budget) <= unit / 2
    for shape, c in zip(g.layers, counts, strict=True):
        assert 1 <= c.kv_heads <= shape.num_kv_heads and 1 <= c.heads_per_group <= shape.group_size
        assert c.channels in (0, shape.intermediate_size) or c.channels % multiple == 0


def test_ratios_are_followed_per_layer(tiny_gqa):
    g = geometry_of(tiny_gqa.adapter)
    counts = counts_from_ratios(g, [0.1, 0.1, 0.6, 0.6], 0.35)
    assert counts[2].channels < counts[0].channels
    assert counts[2].heads <= counts[0].heads


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(tiny_gqa, bad):
    with pytest.raises(OptionError, match=r"sparsity must be in \[0, 1\)"):
        allocate(geometry_of(tiny_gqa.adapter), bad)


def test_unreachable_sparsity_names_the_ceiling(tiny_gqa):
    g = geometry_of(tiny_gqa.adapter)
    ceiling = max_sparsity(g)
    assert 0.9 < ceiling < 1.0
    with pytest.raises(OptionError, match="ask for at most"):
        allocate(g, (ceiling + 1.0) / 2)


def test_unknown_allocation_is_rejected(tiny_gqa):
    with pytest.raises(OptionError, match="unknown allocation 'owls'"):
        allocate(geometry_of(tiny_gqa.adapter), 0.2, "owls")
