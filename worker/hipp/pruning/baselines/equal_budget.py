"""Equal selection budget: a baseline gets as many plan evaluations as HiPP's plan selection spends.

HiPP's matched plan is the best of ``K`` plans scored on the search set (the policy's mean plan plus
``worker.hipp.job.POLICY_SAMPLES`` = 8 samples, so ``K = 9``; ``bench.hipp_vs_baselines`` picks the same way with
``--samples 8``). A one-plan baseline is at a disadvantage, so :func:`best_of_k` builds ``K`` candidate plans
and keeps the one the caller's scorer rates highest, calling the scorer exactly ``K`` times. The scorer is the
caller's (in the benchmarks: the plan evaluator on the search set, never the test set), so this module needs
nothing from ``evaluation``. Candidate families:

- :func:`random_candidates`: ``K`` seeded random allocations (``random``).
- :func:`owl_lambda_candidates`: OWL (``owl-paper``) over ``K`` values of lambda evenly spaced in
  ``[0.02, 0.20]`` (the paper's sweep spans 0.02-0.2).
- :func:`llm_pruner_candidates`: LLM-Pruner's convention over ``K`` protected-layer counts ``0 .. K - 1``
  (capped below the depth), split two at the start for one at the end; counts that leave too few layers to
  reach the sparsity are skipped unscored, so such a selection spends fewer than ``K`` evaluations.

Imports ``errors``, ``allocators``, ``plan`` and the other baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.hipp.errors import OptionError
from worker.hipp.pruning.allocators import Allocator, RandomAllocator
from worker.hipp.pruning.baselines.llm_pruner import LLMPrunerAllocator
from worker.hipp.pruning.baselines.owl import OWLPaperAllocator
from worker.hipp.pruning.plan import PruningPlan

OWL_LAMBDA_RANGE = (0.02, 0.20)


@dataclass(frozen=True)
class Selection:
    """The chosen candidate, every scored candidate's label and search score in the order they were scored,
    and the candidates that cannot reach the sparsity (not built, not scored)."""

    label: str
    plan: PruningPlan
    score: float
    scores: tuple[tuple[str, float], ...]
    infeasible: tuple[str, ...] = ()

    @property
    def evaluations(self) -> int:
        return len(self.scores)


def best_of_k(
    candidates: Sequence[tuple[str, Allocator]],
    build: Callable[[Allocator], PruningPlan],
    score: Callable[[PruningPlan], float],
) -> Selection:
    """Build every candidate's plan, score each once, keep the highest (first one on ties). A candidate that
    cannot reach the sparsity (``build`` raises ``OptionError``, e.g. too many protected layers) is skipped
    unscored; when none can, the error of the last one is raised."""
    if not candidates:
        raise ValueError("best_of_k needs at least one candidate")
    best: tuple[str, PruningPlan, float] | None = None
    scored: list[tuple[str, float]] = []
    infeasible: list[str] = []
    error: OptionError | None = None
    for label, allocator in candidates:
        try:
            plan = build(allocator)
        except OptionError as e:
            infeasible.append(label)
            error = e
            continue
        value = float(score(plan))
        scored.append((label, value))
        if best is None or value > best[2]:
            best = (label, plan, value)
    if best is None:
        assert error is not None
        raise error
    return Selection(best[0], best[1], best[2], tuple(scored), tuple(infeasible))


def random_candidates(k: int, seed: int = 0) -> list[tuple[str, Allocator]]:
    return [(f"random seed {seed + i}", RandomAllocator(seed=seed + i)) for i in range(k)]


def owl_lambda_candidates(k: int) -> list[tuple[str, Allocator]]:
    lo, hi = OWL_LAMBDA_RANGE
    lams = [lo + (hi - lo) * i / (k - 1) for i in range(k)] if k > 1 else [lo]
    return [(f"lambda {lam:.4f}", OWLPaperAllocator(lam)) for lam in lams]


def llm_pruner_candidates(k: int, depth: int) -> list[tuple[str, Allocator]]:
    return [(f"{n} protected", LLMPrunerAllocator.protecting(n)) for n in range(min(k, depth))]
