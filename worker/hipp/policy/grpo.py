"""Plan-level GRPO: train the policy as a contextual bandit where one action is one whole pruning plan.

Per step: sample preference vectors ``w ~ Dirichlet(1)`` (and, for some groups, a requested budget ``s*``),
sample ``G`` plans for each, evaluate them, turn returns into group-normalized advantages ``(R - mean) / std``
and take a few epochs of the clipped policy-gradient objective (one ratio per policy head) with a KL penalty
to the reference (initial, i.e. uniform) policy and an entropy bonus. The return scalarizes the objectives
with ``w`` (linear, or a Chebyshev variant) plus ``lambda_S`` times the stability proxy; the evaluator
pre-screens unstable plans.

The environment is an interface (:class:`Environment`) so the trainer can be tested on a synthetic bandit;
:class:`PruningEnvironment` is the real one (policy state + plan evaluator + importance scores).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from worker.hipp.errors import OptionError
from worker.hipp.evaluation.batch import InProcessEvaluations, PlanBatchEvaluator
from worker.hipp.evaluation.plan_evaluator import PRESCREEN_RETURN, PlanEvaluation, PlanEvaluator, ScoringMode
from worker.hipp.policy.network import Action, HippPolicy, action_to_ratios
from worker.hipp.policy.state import PolicyState
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.criteria import LayerScores
from worker.hipp.pruning.layer_counts import counts_from_ratios
from worker.hipp.pruning.plan import PruningPlan, dense_layer_parameters
from worker.hipp.pruning.planner import select_units
from worker.hipp.pruning.rounding import rounding_cost


@dataclass
class Outcome:
    objectives: list[float]  # utility, robustness, compression
    stability: float
    prescreened: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    features: torch.Tensor
    param_share: torch.Tensor

    def evaluate(self, action: Action, target: float | None) -> Outcome: ...


@runtime_checkable
class BatchEnvironment(Environment, Protocol):
    """An environment that scores many actions at once (the real one: its plans go to a batch evaluator)."""

    def evaluate_many(self, items: Sequence[tuple[Action, float | None]], reporter: Reporter) -> list[Outcome]: ...


def evaluate_actions(env: Environment, items: Sequence[tuple[Action, float | None]],
                     reporter: Reporter = SILENT) -> list[Outcome]:
    """The outcomes of ``items`` (action, target), in order: as one batch when ``env`` can take one, else one by
    one (synthetic environments), checking for cancellation between them."""
    if isinstance(env, BatchEnvironment):
        return env.evaluate_many(items, reporter)
    outcomes = []
    for action, target in items:
        reporter.check()
        outcomes.append(env.evaluate(action, target))
    return outcomes


@dataclass
class GRPOConfig:
    steps: int = 40
    preferences_per_step: int = 4
    group_size: int = 6
    lr: float = 3e-3
    budget_lr_scale: float = 5.0  # the budget head's step relative to lr (see GRPOTrainer._optimizer)
    clip: float = 0.2
    kl_coef: float = 0.01
    entropy_coef: float = 1e-3
    epochs: int = 4
    lambda_stability: float = 0.1
    scalarization: str = "linear"
    matched_fraction: float = 0.5
    matched_budgets: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    checkpoint_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0 or self.group_size < 2 or self.preferences_per_step < 1 or self.epochs < 1:
            raise OptionError("need steps >= 0, group_size >= 2, preferences_per_step >= 1, epochs >= 1")
        if self.scalarization not in ("linear", "chebyshev"):
            raise OptionError(f"unknown scalarization {self.scalarization!r}; use linear or chebyshev")
        if self.lr <= 0 or self.budget_lr_scale <= 0:
            raise OptionError("lr and budget_lr_scale must be positive")
        if not 0 <= self.matched_fraction <= 1:
            raise OptionError("matched_fraction must be in [0, 1]")


def scalarize(objectives: Sequence[float], preference: torch.Tensor, stability: float, lambda_s: float,
              mode: str = "linear") -> float:
    w = preference.tolist()
    if mode == "chebyshev":
        value = -max(wi * (1.0 - oi) for wi, oi in zip(w, objectives, strict=True))
    else:
        value = sum(wi * oi for wi, oi in zip(w, objectives, strict=True))
    return value + lambda_s * stability


def group_advantages(returns: torch.Tensor) -> torch.Tensor:
    std = returns.std()
    return (returns - returns.mean()) / (std if std > 1e-8 else 1.0)


@dataclass
class Sample:
    preference: torch.Tensor
    target: float | None
    action: Action
    advantage: float


class GRPOTrainer:
    def __init__(self, policy: HippPolicy, env: Environment, config: GRPOConfig, out_dir: Path | None = None,
                 reporter: Reporter = SILENT) -> None:
        config.validate()
        self.policy = policy
        self.reference = copy.deepcopy(policy).requires_grad_(False)
        self.env = env
        self.config = config
        self.out_dir = out_dir
        self.reporter = reporter
        self.optimizer = self._optimizer()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.step_index = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0

    def _optimizer(self) -> torch.optim.Optimizer:
        """Adam, with a larger step for the budget head: it learns from one scalar per plan, and its mean
        must move across the whole [s_min, s_max] range as w changes, while the allocation head's many
        per-layer shares need small steps to stay inside the trust region."""
        budget = list(self.policy.budget_head.parameters())
        ids = {id(p) for p in budget}
        rest = [p for p in self.policy.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [
            {"params": rest}, {"params": budget, "lr": self.config.lr * self.config.budget_lr_scale}]
        return torch.optim.Adam(groups, lr=self.config.lr)

    # --- one step ------------------------------------------------------------------------------------
    def _sample_context(self) -> tuple[torch.Tensor, float | None]:
        w = self._dirichlet()
        target = None
        if self.config.matched_budgets and self.rng.random() < self.config.matched_fraction:
            target = self.rng.choice(self.config.matched_budgets)
        return w, target

    def _dirichlet(self) -> torch.Tensor:
        gammas = torch.tensor([self.rng.gammavariate(1.0, 1.0) for _ in range(3)], dtype=torch.float32)
        return gammas / gammas.sum()

    def step(self) -> dict[str, Any]:
        start = time.perf_counter()
        samples: list[Sample] = []
        returns_all, objectives_all, prescreened = [], [], 0
        # All plans of the step are sampled first (contexts from self.rng, actions from self.generator, in the
        # same order as when each group was evaluated before the next was sampled: evaluation draws no random
        # numbers) and evaluated as one batch, which an evaluation queue can spread over workers.
        groups = []
        for _ in range(self.config.preferences_per_step):
            w, target = self._sample_context()
            actions = [self.policy.sample(self.env.features, self.env.param_share, w, target, self.generator)
                       for _ in range(self.config.group_size)]
            groups.append((w, target, actions))
        self.reporter.check()
        outcomes_all = evaluate_actions(self.env, [(a, target) for _, target, actions in groups for a in actions],
                                        self.reporter)
        for g, (w, target, actions) in enumerate(groups):
            outcomes = outcomes_all[g * self.config.group_size:(g + 1) * self.config.group_size]
            returns = torch.tensor([
                PRESCREEN_RETURN if o.prescreened else scalarize(o.objectives, w, o.stability,
                                                                 self.config.lambda_stability,
                                                                 self.config.scalarization)
                for o in outcomes])
            prescreened += sum(o.prescreened for o in outcomes)
            advantages = group_advantages(returns)
            samples += [Sample(w, target, a, float(adv)) for a, adv in zip(actions, advantages, strict=True)]
            returns_all += returns.tolist()
            objectives_all += [o.objectives for o in outcomes if not o.prescreened]
        losses = [self._update(samples) for _ in range(self.config.epochs)]
        self.step_index += 1
        self.elapsed += time.perf_counter() - start
        mean_obj = torch.tensor(objectives_all).mean(0).tolist() if objectives_all else [math.nan] * 3
        record = {"step": self.step_index, "return": sum(returns_all) / len(returns_all),
                  "utility": mean_obj[0], "robustness": mean_obj[1], "compression": mean_obj[2],
                  "prescreened": prescreened, "plans": len(returns_all), **losses[-1],
                  "elapsed_s": self.elapsed}
        self.history.append(record)
        return record

    def _update(self, samples: Sequence[Sample]) -> dict[str, float]:
        self.optimizer.zero_grad()
        policy_terms, kls, entropies = [], [], []
        cache: dict[tuple[int, float | None], Any] = {}
        for s in samples:
            key = (id(s.preference), s.target)
            if key not in cache:
                cache[key] = (self.policy.distributions(self.env.features, self.env.param_share, s.preference,
                                                        s.target),
                              self.reference.distributions(self.env.features, self.env.param_share,
                                                           s.preference, s.target))
            dists, ref_dists = cache[key]
            new_parts = self.policy.log_prob_parts(s.action, self.env.features, self.env.param_share,
                                                   s.preference, s.target, dists)
            policy_terms.append(self._clipped_objective(new_parts, s))
            new_lp = sum(new_parts.values(), torch.zeros(()))
            with torch.no_grad():
                ref_lp = self.reference.log_prob(s.action, self.env.features, self.env.param_share, s.preference,
                                                 s.target, ref_dists)
            log_ratio = ref_lp - new_lp
            kls.append(log_ratio.exp() - log_ratio - 1)  # k3 estimator, >= 0
        for dists, _ in cache.values():
            entropies.append(dists.entropy())
        objective = torch.stack(policy_terms).mean()
        kl = torch.stack(kls).mean()
        entropy = torch.stack(entropies).mean()
        loss = -objective + self.config.kl_coef * kl - self.config.entropy_coef * entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        return {"loss": loss.item(), "kl": kl.item(), "entropy": entropy.item()}

    def _clipped_objective(self, new_parts: dict[str, torch.Tensor], sample: Sample) -> torch.Tensor:
        """The clipped surrogate, one ratio per head. With a single plan-level ratio, the Dirichlet over all
        layers moves the joint ratio out of the trust region within an epoch and the clip then also stops
        the budget head's gradient; clipping each head's ratio keeps both learning at their own pace."""
        terms = []
        for name, new_lp in new_parts.items():
            ratio = (new_lp - sample.action.parts[name]).exp()
            clipped = ratio.clamp(1 - self.config.clip, 1 + self.config.clip)
            terms.append(torch.minimum(ratio * sample.advantage, clipped * sample.advantage))
        return torch.stack(terms).sum()

    # --- loop, checkpoints ---------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        self.reporter.stage("grpo", f"{self.config.steps} steps x {self.config.preferences_per_step} preferences "
                                    f"x {self.config.group_size} plans")
        while self.step_index < self.config.steps:
            self.reporter.check()
            record = self.step()
            self.reporter.progress(self.step_index, self.config.steps,
                                   f"return {record['return']:.3f}")
            if self.out_dir is not None:
                with (self.out_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.step_index % self.config.checkpoint_every == 0 or self.step_index == self.config.steps:
                    self.save_checkpoint(self.out_dir / "checkpoint")
        return self.history

    def save_checkpoint(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.policy.state_dict().items()}, str(path / "policy.safetensors"))
        # Optimizer moments and RNG state are training state, not a model: torch.save with tensors only.
        torch.save({"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()},
                   path / "trainer_state.pt")
        (path / "trainer.json").write_text(json.dumps({
            "step": self.step_index, "elapsed": self.elapsed, "history": self.history,
            "rng": list(self.rng.getstate()[1]), "rng_version": self.rng.getstate()[0],
            "config": asdict(self.config)}))

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.policy.load_state_dict(load_file(str(path / "policy.safetensors")))
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        meta = json.loads((path / "trainer.json").read_text())
        self.step_index, self.elapsed, self.history = meta["step"], meta["elapsed"], meta["history"]
        self.rng.setstate((meta["rng_version"], tuple(meta["rng"]), None))


class PruningEnvironment:
    """The real environment: actions -> feasible plans (criterion scores pick the units) -> evaluator.

    Plans are scored through ``evaluations`` (default: in this process by ``evaluator``; the service may pass
    one that spreads them over evaluation workers, see :mod:`worker.hipp.evaluation.batch`)."""

    def __init__(self, policy: HippPolicy, state: PolicyState, evaluator: PlanEvaluator,
                 scores: Sequence[LayerScores], mlp_multiple: int = 1,
                 evaluations: PlanBatchEvaluator | None = None) -> None:
        self.policy = policy
        self.state = state
        self.evaluator = evaluator
        self.evaluations = evaluations or InProcessEvaluations(evaluator)
        self.scores = scores
        self.mlp_multiple = mlp_multiple
        geometry = evaluator.geometry
        self.geometry = geometry
        self.layer_params = [dense_layer_parameters(s, geometry.hidden_size) for s in geometry.layers]
        total = sum(self.layer_params)
        self.features = state.features
        self.param_share = torch.tensor([p / total for p in self.layer_params], dtype=torch.float32)

    def plan_for(self, action: Action, target: float | None, meta: dict[str, Any] | None = None) -> PruningPlan:
        ratios, budget = action_to_ratios(action, self.layer_params, self.policy.config, target)
        budget = min(max(budget, 0.0), 0.95)
        counts = counts_from_ratios(self.geometry, ratios, budget, self.mlp_multiple)
        layers = [select_units(s, c, sc) for s, c, sc in zip(self.geometry.layers, counts, self.scores, strict=True)]
        meta = dict(meta or {})
        if self.mlp_multiple > 1:
            meta["rounding"] = rounding_cost(self.geometry, ratios, budget, counts, self.mlp_multiple).to_dict()
        plan = PruningPlan(self.geometry, layers, self.mlp_multiple, meta)
        plan.validate()
        return plan

    def mode(self, target: float | None) -> ScoringMode:
        """Objectives in this policy's terms: compression against the policy's s_max, or closeness to
        ``target`` in matched mode (the evaluator may have been set up for another range)."""
        return ScoringMode(self.policy.config.s_max, target)

    def score(self, plan: PruningPlan, target: float | None) -> PlanEvaluation:
        """Evaluate ``plan`` in :meth:`mode`."""
        return self.score_many([(plan, target)])[0]

    def score_many(self, items: Sequence[tuple[PruningPlan, float | None]],
                   reporter: Reporter = SILENT) -> list[PlanEvaluation]:
        """Evaluate (plan, target) pairs as one batch, each in its :meth:`mode`."""
        return self.evaluations.evaluate_many([(plan, self.mode(target)) for plan, target in items], reporter)

    def evaluate(self, action: Action, target: float | None) -> Outcome:
        return self.evaluate_many([(action, target)], SILENT)[0]

    def evaluate_many(self, items: Sequence[tuple[Action, float | None]], reporter: Reporter) -> list[Outcome]:
        results = self.score_many([(self.plan_for(action, target), target) for action, target in items], reporter)
        return [self.outcome(r) for r in results]

    @staticmethod
    def outcome(result: PlanEvaluation) -> Outcome:
        o = result.objectives
        return Outcome([o.utility, o.robustness, o.compression], o.stability, result.prescreened,
                       {"fingerprint": result.fingerprint, "sparsity": result.sparsity, "metrics": result.metrics})
