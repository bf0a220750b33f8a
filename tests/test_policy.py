"""The hierarchical policy and plan-level GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from worker.hipp.errors import OptionError
from worker.hipp.policy.grpo import GRPOConfig, GRPOTrainer, Outcome, group_advantages, scalarize
from worker.hipp.policy.network import (
    Action,
    HippPolicy,
    PolicyConfig,
    action_to_ratios,
    validate_preference,
    water_fill,
)

LAYERS = 4
FEATURES = torch.randn(LAYERS, 5, generator=torch.Generator().manual_seed(0))
SIZES = [100, 100, 200, 400]
SHARE = torch.tensor([s / sum(SIZES) for s in SIZES])
W = torch.tensor([0.2, 0.5, 0.3])


def policy(**kw) -> HippPolicy:
    torch.manual_seed(0)
    return HippPolicy(PolicyConfig(num_features=5, **kw))


def test_untrained_policy_proposes_the_uniform_allocation():
    p = policy()
    mean = p.mean_action(FEATURES, SHARE, W, target=0.3)
    assert torch.allclose(mean.shares, SHARE, atol=1e-6)
    ratios, budget = action_to_ratios(mean, SIZES, p.config, 0.3)
    assert ratios == pytest.approx([0.3] * LAYERS) and budget == 0.3
    free = p.mean_action(FEATURES, SHARE, W)
    c = p.config
    anchor = c.anchor_low + (c.anchor_high - c.anchor_low) * float(W[2])  # the untrained offset is zero
    assert float(free.budget) == pytest.approx(c.s_min + (c.s_max - c.s_min) * anchor)
    legacy = policy(budget_head="logistic").mean_action(FEATURES, SHARE, W)
    assert float(legacy.budget) == pytest.approx((c.s_min + c.s_max) / 2)


def _budgets_along_compression(p: HippPolicy, split: float) -> list[float]:
    budgets = []
    for w_c in [i / 10 for i in range(11)]:
        rest = 1 - w_c
        w = torch.tensor([split * rest, (1 - split) * rest, w_c])
        budgets.append(float(p.mean_action(FEATURES, SHARE, w).budget))
    return budgets


@pytest.mark.parametrize("scale", [0.0, 1.0, 10.0, 1000.0])
def test_budget_is_monotone_in_compression_weight_with_bounded_steps(scale):
    # Whatever GRPO does to the budget head's weights, the budget rises with w_C and a 0.1 step of w_C moves it
    # by at most exp(tau) * 0.09 of [s_min, s_max] (the anchored head's guarantee; 0.13 for s_max - s_min = 0.7).
    # (The head reads no other parameters: the encoder's do not reach the budget.)
    p = policy(s_max=0.8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in p.budget_head.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g))
    for split in (0.0, 0.3, 0.5, 1.0):
        budgets = _budgets_along_compression(p, split)
        steps = [b - a for a, b in zip(budgets, budgets[1:], strict=False)]
        assert all(step > 0 for step in steps), budgets
        assert max(steps) <= 0.15, budgets


def test_legacy_logistic_budget_head_can_switch():
    # Why the anchored head exists: the logistic head's budget is a logistic function of w, so large weights
    # make it a switch between s_min and s_max.
    p = policy(s_max=0.8, budget_head="logistic")
    with torch.no_grad():
        p.budget_head.weight.zero_()
        p.budget_head.weight[0, -1] = 60.0  # log alpha grows with w_C
        p.budget_head.bias[0] = -30.0
    budgets = _budgets_along_compression(p, 0.5)
    steps = [b - a for a, b in zip(budgets, budgets[1:], strict=False)]
    assert max(steps) > 0.3


def test_mean_budget_samples_vary_only_the_allocation():
    p = policy()
    g = torch.Generator().manual_seed(5)
    mean = p.mean_action(FEATURES, SHARE, W)
    drawn = [p.sample(FEATURES, SHARE, W, None, g, mean_budget=True) for _ in range(5)]
    assert all(float(a.budget) == pytest.approx(float(mean.budget)) for a in drawn)
    assert len({tuple(a.shares.tolist()) for a in drawn}) == 5


def test_sampling_matches_closed_form_log_probability():
    # E[-log p(x)] over samples equals the closed-form entropy only if sampling and log_prob agree.
    p = policy()
    g = torch.Generator().manual_seed(1)
    actions = [p.sample(FEATURES, SHARE, W, None, g) for _ in range(1000)]
    dists = p.distributions(FEATURES, SHARE, W)
    # Budget log-density is taken in the unit interval: shift by the rescaling Jacobian.
    jacobian = math.log(p.config.s_max - p.config.s_min)
    empirical = -torch.stack([a.log_prob for a in actions]).mean().item() + jacobian
    with torch.no_grad():
        assert empirical == pytest.approx(float(dists.entropy()) + jacobian, abs=0.2)
    budgets = torch.stack([a.budget for a in actions])
    unit = (budgets - p.config.s_min) / (p.config.s_max - p.config.s_min)
    assert float(unit.mean()) == pytest.approx(float(dists.budget.mean), abs=0.02)
    assert float(unit.var()) == pytest.approx(float(dists.budget.variance), rel=0.15)
    shares = torch.stack([a.shares for a in actions])
    assert torch.allclose(shares.mean(0), dists.allocation.mean, atol=0.01)
    # Re-scoring a stored action gives its stored log-probability.
    assert float(p.log_prob(actions[0], FEATURES, SHARE, W)) == pytest.approx(float(actions[0].log_prob), abs=1e-5)


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.6, 0.8])
def test_budget_projection_is_exact_under_bounds(budget):
    config = PolicyConfig(num_features=5, r_min=0.0, r_max=0.85)
    shares = torch.tensor([0.7, 0.1, 0.1, 0.1])  # asks layer 0 for far more than its cap
    ratios, realised = action_to_ratios(Action(torch.tensor(budget), shares, torch.zeros(())), SIZES, config)
    removed = sum(r * s for r, s in zip(ratios, SIZES, strict=True))
    assert realised == pytest.approx(budget, abs=1e-7)  # the action stores the budget in float32
    assert removed == pytest.approx(realised * sum(SIZES), rel=1e-9)
    assert all(config.r_min - 1e-12 <= r <= config.r_max + 1e-12 for r in ratios)


def test_water_fill_saturates_and_keeps_order():
    x = water_fill(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]), 2.5)
    assert float(x.sum()) == pytest.approx(2.5) and float(x[2]) == pytest.approx(1.0)
    assert x[0] < x[1]


@pytest.mark.parametrize(
    ("values", "message"),
    [([0.5, -0.1, 0.6], "non-negative"), ([float("nan"), 0.5, 0.5], "finite"), ([0, 0, 0], "all zero"),
     ([0.5, 0.5], "needs 3 values")],
)
def test_invalid_preferences_fail_clearly(values, message):
    with pytest.raises(OptionError, match=message):
        validate_preference(values)
    assert validate_preference([2, 1, 1]).tolist() == pytest.approx([0.5, 0.25, 0.25])


class Bandit:
    """A synthetic environment whose best allocation is known: shares close to ``best`` score highest."""

    def __init__(self, best: torch.Tensor) -> None:
        self.best = best
        self.features = FEATURES
        self.param_share = SHARE
        self.calls = 0

    def evaluate(self, action: Action, target: float | None) -> Outcome:
        self.calls += 1
        quality = 1.0 - 4.0 * float((action.shares - self.best).abs().sum())
        return Outcome([quality, quality, 0.0], 1.0)


def test_grpo_converges_to_the_known_best_allocation():
    best = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p = policy()
    env = Bandit(best)
    start = float((p.mean_action(FEATURES, SHARE, W, 0.3).shares - best).abs().sum())
    trainer = GRPOTrainer(p, env, GRPOConfig(steps=40, preferences_per_step=2, group_size=8, lr=0.04,
                                             kl_coef=0.0, matched_fraction=1.0, matched_budgets=(0.3,), seed=0))
    history = trainer.train()
    end = float((p.mean_action(FEATURES, SHARE, W, 0.3).shares - best).abs().sum())
    assert end < 0.25 * start, (start, end)
    assert history[-1]["return"] > history[0]["return"]
    assert env.calls == 40 * 2 * 8


class BudgetBandit:
    """A synthetic environment whose best budget depends on w: quality falls with the budget, compression
    rises, so compression-heavy preferences should get large budgets and the others small ones."""

    features = FEATURES
    param_share = SHARE

    def __init__(self, s_max: float) -> None:
        self.s_max = s_max

    def evaluate(self, action: Action, target: float | None) -> Outcome:
        budget = float(action.budget)
        quality = 1.0 - 2.0 * budget**2
        return Outcome([quality, quality, budget / self.s_max], 1.0)


class SplitBandit(BudgetBandit):
    """Robustness falls fast with the budget, utility does not: robustness-leaning preferences should learn a
    smaller budget than utility-leaning ones with the same compression weight."""

    def evaluate(self, action: Action, target: float | None) -> Outcome:
        budget = float(action.budget)
        return Outcome([1.0, 1.0 - 4.0 * budget**2, budget / self.s_max], 1.0)


def test_grpo_budget_head_learns_the_utility_robustness_trade():
    p = policy()
    utility, robust = torch.tensor([0.6, 0.0, 0.4]), torch.tensor([0.0, 0.6, 0.4])

    def gap() -> float:
        return float(p.mean_action(FEATURES, SHARE, utility).budget - p.mean_action(FEATURES, SHARE, robust).budget)

    assert gap() == pytest.approx(0.0, abs=1e-6)  # same w_C, untrained offset: same budget
    trainer = GRPOTrainer(p, SplitBandit(p.config.s_max),
                          GRPOConfig(steps=30, preferences_per_step=4, group_size=8, lr=0.01, matched_fraction=0.0,
                                     seed=0))
    trainer.train()
    assert gap() > 0.1, gap()


def test_grpo_budget_head_still_follows_the_compression_weight():
    p = policy()
    compress, keep = torch.tensor([0.1, 0.1, 0.8]), torch.tensor([0.45, 0.45, 0.1])
    GRPOTrainer(p, BudgetBandit(p.config.s_max),
                GRPOConfig(steps=30, preferences_per_step=4, group_size=8, lr=0.01, matched_fraction=0.0,
                           seed=0)).train()
    gap = float(p.mean_action(FEATURES, SHARE, compress).budget - p.mean_action(FEATURES, SHARE, keep).budget)
    assert gap > 0.25, gap


def test_checkpoint_round_trip_gives_same_plans(tmp_path):
    p = policy()
    trainer = GRPOTrainer(p, Bandit(torch.tensor([0.4, 0.3, 0.2, 0.1])),
                          GRPOConfig(steps=3, preferences_per_step=1, group_size=4, seed=3))
    trainer.train()
    trainer.save_checkpoint(tmp_path / "ck")
    other = policy()
    resumed = GRPOTrainer(other, Bandit(torch.tensor([0.4, 0.3, 0.2, 0.1])),
                          GRPOConfig(steps=3, preferences_per_step=1, group_size=4, seed=3))
    resumed.load_checkpoint(tmp_path / "ck")
    assert resumed.step_index == 3 and resumed.history == trainer.history
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = p.sample(FEATURES, SHARE, W, None, g1)
    b = other.sample(FEATURES, SHARE, W, None, g2)
    assert torch.equal(a.shares, b.shares) and torch.equal(a.budget, b.budget)
    # Resumed training continues from the same RNG and optimizer state as an uninterrupted run.
    trainer.config.steps = resumed.config.steps = 5
    trainer.train()
    resumed.train()
    assert [h["return"] for h in trainer.history] == pytest.approx([h["return"] for h in resumed.history])


def test_scalarization_and_advantages():
    assert scalarize([1.0, 0.5, 0.0], W, 1.0, 0.1) == pytest.approx(0.2 + 0.25 + 0.1)
    assert scalarize([1.0, 0.5, 0.0], W, 1.0, 0.0, "chebyshev") == pytest.approx(-0.3)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0]))
    assert float(adv.mean()) == pytest.approx(0.0) and float(adv.std()) == pytest.approx(1.0)
    assert group_advantages(torch.tensor([1.0, 1.0])).tolist() == [0.0, 0.0]


def test_flat_policy_samples_ratios_within_bounds():
    p = policy(flat=True)
    a = p.sample(FEATURES, SHARE, W, 0.4, torch.Generator().manual_seed(0))
    ratios, budget = action_to_ratios(a, SIZES, p.config, 0.4)
    assert sum(r * s for r, s in zip(ratios, SIZES, strict=True)) == pytest.approx(0.4 * sum(SIZES))
    assert all(0 <= r <= p.config.r_max + 1e-9 for r in ratios)
