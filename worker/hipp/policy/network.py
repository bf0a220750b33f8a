"""The hierarchical, preference-conditioned pruning policy.

One call returns a whole plan as two actions:

- a global budget ``s ~ Beta(alpha, beta)`` rescaled to ``[s_min, s_max]`` (skipped in matched-sparsity mode,
  where the requested ``s*`` is the budget). Its mean is anchored to the compression weight:
  ``logit(mean) = logit(a(w_C)) + tau * tanh(offset)`` with ``a`` linear and increasing in ``w_C``, and the learned
  offset (and the Beta's concentration) read only the model's features and the utility/robustness split of ``w``.
  So the budget is monotone in ``w_C`` by construction and moves with it at a bounded rate, while GRPO still
  learns how much a model tolerates. (A first design learned ``log alpha, log beta`` linear in ``w``: linear
  scalarization over the testbed's flat-then-falling front taught it a switch, 0.1-0.3 or 0.8 and nothing
  between; policies trained that way load as ``budget_head="logistic"``.);
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
    #: ``anchored`` (the budget's mean follows w_C, see the module docstring) or ``logistic`` (legacy policies).
    budget_head: str = "anchored"
    #: The anchored head: the mean's position in [s_min, s_max] at w_C = 0 and 1, and the learned offset's bound
    #: in logits (0.75 keeps adjacent w_C steps of 0.1 within about 0.13 of sparsity for s_max - s_min = 0.7).
    anchor_low: float = 0.05
    anchor_high: float = 0.95
    budget_offset: float = 0.75

    def validate(self) -> None:
        if not 0 <= self.s_min < self.s_max < 1:
            raise OptionError(f"need 0 <= s_min < s_max < 1, got {self.s_min}, {self.s_max}")
        if not 0 <= self.r_min < self.r_max <= 1:
            raise OptionError(f"need 0 <= r_min < r_max <= 1, got {self.r_min}, {self.r_max}")
        if self.budget_head not in ("anchored", "logistic"):
            raise OptionError(f"unknown budget_head {self.budget_head!r}; use anchored or logistic")
        if not 0 < self.anchor_low < self.anchor_high < 1 or self.budget_offset < 0:
            raise OptionError("need 0 < anchor_low < anchor_high < 1 and budget_offset >= 0")

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
        if config.budget_head == "anchored":
            # Reads the model (mean feature token) and the utility/robustness split, never w_C: see _budget.
            self.budget_head = nn.Linear(config.num_features + 1, 2)
        else:
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
            budget = self._budget(features, context, preference)
        return Distributions(budget, allocation, None)

    def _budget(self, features: torch.Tensor, context: torch.Tensor, preference: torch.Tensor) -> Beta:
        base = self.config.budget_concentration
        if self.config.budget_head == "logistic":
            ab = self.budget_head(torch.cat([context, preference])).exp() * base
            return Beta(ab[0], ab[1])
        c = self.config
        w_u, w_r, w_c = preference[0], preference[1], preference[2]
        split = w_u / (w_u + w_r) if float(w_u + w_r) > 1e-6 else torch.tensor(0.5)
        out = self.budget_head(torch.cat([features.mean(0), split.reshape(1)]))
        anchor = c.anchor_low + (c.anchor_high - c.anchor_low) * w_c
        mean = torch.sigmoid(torch.logit(anchor) + c.budget_offset * torch.tanh(out[0]))
        concentration = base * out[1].clamp(-3.0, 3.0).exp()
        return Beta(mean * concentration, (1 - mean) * concentration)

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
               target: float | None = None, generator: torch.Generator | None = None,
               mean_budget: bool = False) -> Action:
        """A plan drawn from the policy. ``mean_budget``: the budget at the head's mean (only the allocation is
        drawn): a job's search compares allocations for the budget its preference asks for."""
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
                        u = dists.budget.mean if mean_budget else dists.budget.sample()
                        budget = self._to_budget(u.clamp(1e-6, 1 - 1e-6))
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
