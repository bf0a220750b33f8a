"""The hierarchical, preference-conditioned pruning policy.

One call returns a whole plan as two actions:

- a global budget ``s ~ Beta(alpha, beta)`` rescaled to ``[s_min, s_max]`` (skipped in matched-sparsity mode,
  where the requested ``s*`` is the budget);
- a layer-wise allocation of that budget ``pi ~ Dirichlet(kappa * m)`` over layers, where ``m`` is a softmax
  of per-layer logits offset by the layers' parameter shares.

Both heads read per-layer tokens (the policy state features) concatenated with the preference vector ``w`` and
the requested budget. The last layers start at zero, so an untrained policy's mean plan is exactly the uniform
allocation. ``log p(plan) = log Beta(u) + log Dirichlet(pi)`` in closed form, as plan-level GRPO needs; the two
terms are also returned apart (:meth:`HippPolicy.log_prob_parts`) so the trainer can clip each head's ratio alone.

Ratios follow as ``r_l = s * P * pi_l / P_l`` (``P`` prunable parameters), projected by water-filling onto
``[r_min, r_max]`` so the removed parameters still equal the budget exactly; ``layer_counts.counts_from_ratios``
then makes them feasible unit counts. The ``flat`` variant (an ablation) samples one Beta ratio per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.distributions import Beta, Dirichlet

from worker.hipp.errors import OptionError
from worker.hipp.preference import KEYS, Preference

PREFERENCE_KEYS = KEYS


def validate_preference(values: Sequence[float]) -> torch.Tensor:
    """Three weights in ``PREFERENCE_KEYS`` order, validated and normalized by :class:`Preference`."""
    return torch.tensor(Preference.from_values(values).as_list(), dtype=torch.float32)


@dataclass
class PolicyConfig:
    num_features: int
    hidden: int = 64
    s_min: float = 0.1
    s_max: float = 0.6
    r_min: float = 0.0
    r_max: float = 0.85
    kappa: float = 100.0
    budget_concentration: float = 4.0
    flat: bool = False

    def validate(self) -> None:
        if not 0 <= self.s_min < self.s_max < 1:
            raise OptionError(f"need 0 <= s_min < s_max < 1, got {self.s_min}, {self.s_max}")
        if not 0 <= self.r_min < self.r_max <= 1:
            raise OptionError(f"need 0 <= r_min < r_max <= 1, got {self.r_min}, {self.r_max}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Action:
    """One sampled plan, before it is made feasible: budget and allocation shares."""

    budget: torch.Tensor  # scalar sparsity in [s_min, s_max]
    shares: torch.Tensor  # [layers], sums to 1 (the flat variant stores ratios here)
    log_prob: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # log-probability per head; sums to log_prob

    def detach(self) -> Action:
        return Action(self.budget.detach(), self.shares.detach(), self.log_prob.detach(),
                      {k: v.detach() for k, v in self.parts.items()})


@dataclass
class Distributions:
    budget: Beta | None
    allocation: Dirichlet | None
    per_layer: Beta | None  # flat variant

    def entropy(self) -> torch.Tensor:
        total = torch.zeros(())
        for dist in (self.budget, self.allocation, self.per_layer):
            if dist is not None:
                total = total + dist.entropy().sum()
        return total


class HippPolicy(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        width = config.num_features + len(PREFERENCE_KEYS) + 2  # + requested budget and its flag
        self.encoder = nn.Sequential(nn.Linear(width, config.hidden), nn.Tanh(),
                                     nn.Linear(config.hidden, config.hidden), nn.Tanh())
        self.allocation_head = nn.Linear(2 * config.hidden, 2)  # share logit, per-layer ratio (flat)
        self.budget_head = nn.Linear(config.hidden + len(PREFERENCE_KEYS), 2)
        self.log_kappa = nn.Parameter(torch.tensor(math.log(config.kappa)))
        for head in (self.allocation_head, self.budget_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    # --- distributions ---------------------------------------------------------------------------------
    def distributions(self, features: torch.Tensor, param_share: torch.Tensor, preference: torch.Tensor,
                      target: float | None = None) -> Distributions:
        n = features.shape[0]
        requested = torch.tensor([target if target is not None else 0.0, 1.0 if target is not None else 0.0])
        tokens = torch.cat([features, preference.expand(n, -1), requested.expand(n, -1)], dim=1)
        hidden = self.encoder(tokens)
        context = hidden.mean(0)
        out = self.allocation_head(torch.cat([hidden, context.expand(n, -1)], dim=1))
        base = self.config.budget_concentration
        if self.config.flat:
            # Per-layer Beta over [r_min, r_max]: mean starts at the uniform ratio for the middle budget.
            mean0 = self._unit_ratio((self.config.s_min + self.config.s_max) / 2 if target is None else target)
            logit0 = math.log(mean0 / (1 - mean0))
            mean = torch.sigmoid(out[:, 1] + logit0)
            return Distributions(None, None, Beta(mean * base * 2, (1 - mean) * base * 2))
        mean_shares = torch.softmax(out[:, 0] + param_share.clamp_min(1e-9).log(), dim=0)
        allocation = Dirichlet(self.log_kappa.exp() * mean_shares)
        budget = None
        if target is None:
            ab = self.budget_head(torch.cat([context, preference])).exp() * base
            budget = Beta(ab[0], ab[1])
        return Distributions(budget, allocation, None)

    def _unit_ratio(self, s: float) -> float:
        c = self.config
        return min(max((s - c.r_min) / (c.r_max - c.r_min), 0.05), 0.95)

    # --- actions ---------------------------------------------------------------------------------------
    def _to_budget(self, u: torch.Tensor) -> torch.Tensor:
        return self.config.s_min + (self.config.s_max - self.config.s_min) * u

    def _from_budget(self, s: torch.Tensor) -> torch.Tensor:
        u = (s - self.config.s_min) / (self.config.s_max - self.config.s_min)
        return u.clamp(1e-6, 1 - 1e-6)

    def sample(self, features: torch.Tensor, param_share: torch.Tensor, preference: torch.Tensor,
               target: float | None = None, generator: torch.Generator | None = None) -> Action:
        with torch.no_grad():
            dists = self.distributions(features, param_share, preference, target)
            with _seeded(generator):
                if dists.per_layer is not None:
                    ratios = dists.per_layer.sample().clamp(1e-6, 1 - 1e-6)
                    shares = self.config.r_min + (self.config.r_max - self.config.r_min) * ratios
                    budget = torch.tensor(target if target is not None else float("nan"))
                else:
                    assert dists.allocation is not None
                    shares = dists.allocation.sample().clamp_min(1e-12)
                    shares = shares / shares.sum()
                    if dists.budget is not None:
                        budget = self._to_budget(dists.budget.sample().clamp(1e-6, 1 - 1e-6))
                    else:
                        assert target is not None
                        budget = torch.tensor(float(target))
        action = Action(budget, shares, torch.zeros(()))
        with torch.no_grad():
            action.parts = self.log_prob_parts(action, features, param_share, preference, target, dists)
            action.log_prob = sum(action.parts.values(), torch.zeros(()))
        return action

    def mean_action(self, features: torch.Tensor, param_share: torch.Tensor, preference: torch.Tensor,
                    target: float | None = None) -> Action:
        """The distributions' means: the policy's single best guess."""
        with torch.no_grad():
            dists = self.distributions(features, param_share, preference, target)
            if dists.per_layer is not None:
                shares = self.config.r_min + (self.config.r_max - self.config.r_min) * dists.per_layer.mean
                budget = torch.tensor(target if target is not None else float("nan"))
            else:
                assert dists.allocation is not None
                shares = dists.allocation.mean
                budget = (self._to_budget(dists.budget.mean) if dists.budget is not None
                          else torch.tensor(float(target if target is not None else "nan")))
        return Action(budget, shares, torch.zeros(()))

    def log_prob(self, action: Action, features: torch.Tensor, param_share: torch.Tensor,
                 preference: torch.Tensor, target: float | None = None,
                 dists: Distributions | None = None) -> torch.Tensor:
        parts = self.log_prob_parts(action, features, param_share, preference, target, dists)
        return sum(parts.values(), torch.zeros(()))

    def log_prob_parts(self, action: Action, features: torch.Tensor, param_share: torch.Tensor,
                       preference: torch.Tensor, target: float | None = None,
                       dists: Distributions | None = None) -> dict[str, torch.Tensor]:
        """``{"allocation": log Dirichlet, "budget": log Beta}`` (``{"per_layer": ...}`` for the flat variant;
        no budget term in matched-sparsity mode)."""
        dists = dists or self.distributions(features, param_share, preference, target)
        if dists.per_layer is not None:
            c = self.config
            unit = ((action.shares - c.r_min) / (c.r_max - c.r_min)).clamp(1e-6, 1 - 1e-6)
            return {"per_layer": dists.per_layer.log_prob(unit).sum()}
        assert dists.allocation is not None
        parts = {"allocation": dists.allocation.log_prob(action.shares)}
        if dists.budget is not None:
            parts["budget"] = dists.budget.log_prob(self._from_budget(action.budget))
        return parts


class _seeded:
    """Sample with ``generator``'s stream (torch distributions take no generator argument)."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self._fork: object | None = None

    def __enter__(self) -> None:
        if self.generator is not None:
            self._fork = torch.random.fork_rng()
            self._fork.__enter__()  # type: ignore[attr-defined]
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))

    def __exit__(self, *exc: object) -> None:
        if self._fork is not None:
            self._fork.__exit__(None, None, None)  # type: ignore[attr-defined]


# --- from an action to per-layer ratios ----------------------------------------------------------------


def water_fill(weights: torch.Tensor, capacity_lo: torch.Tensor, capacity_hi: torch.Tensor,
               budget: float, iterations: int = 100) -> torch.Tensor:
    """``x = clip(lam * weights, lo, hi)`` with ``lam`` found by bisection so that ``sum(x) == budget``."""
    lo_total, hi_total = float(capacity_lo.sum()), float(capacity_hi.sum())
    if budget <= lo_total:
        return capacity_lo.clone()
    if budget >= hi_total:
        return capacity_hi.clone()
    low, high = 0.0, 1.0
    while float(torch.clamp(high * weights, capacity_lo, capacity_hi).sum()) < budget:
        high *= 2
    for _ in range(iterations):
        mid = (low + high) / 2
        if float(torch.clamp(mid * weights, capacity_lo, capacity_hi).sum()) < budget:
            low = mid
        else:
            high = mid
    x = torch.clamp(high * weights, capacity_lo, capacity_hi)
    # Bisection leaves a tiny residual; put it on the layers that are not at a bound.
    free = (x > capacity_lo) & (x < capacity_hi)
    if free.any():
        x[free] += (budget - float(x.sum())) / int(free.sum())
    return x


def action_to_ratios(action: Action, layer_params: Sequence[int], config: PolicyConfig,
                     target: float | None = None) -> tuple[list[float], float]:
    """Per-layer ratios and the budget they realise (exactly, before unit rounding)."""
    sizes = torch.tensor(layer_params, dtype=torch.float64)
    total = float(sizes.sum())
    if config.flat:
        ratios = action.shares.double()
        if target is None:
            return ratios.tolist(), float((ratios * sizes).sum() / total)
        removed = water_fill(ratios * sizes, config.r_min * sizes, config.r_max * sizes, target * total)
        return (removed / sizes).tolist(), target
    budget = target if target is not None else float(action.budget)
    removed = water_fill(action.shares.double() * budget * total, config.r_min * sizes, config.r_max * sizes,
                         budget * total)
    return (removed / sizes).tolist(), budget
