"""Evaluating many plans at once: the seam between the plan search (GRPO training, a job's plan search) and
where plan evaluations run.

The search code builds all plans of a step first and hands them over as one batch of
``(plan, ScoringMode)`` requests to a :class:`PlanBatchEvaluator`; the answers come back in request order.

- :class:`InProcessEvaluations` (the default) scores them one by one with the local :class:`PlanEvaluator`.
- :class:`DelegatedEvaluations` answers cache hits locally and hands the misses (each distinct plan once) to
  a ``send`` function that evaluates them elsewhere (the service's evaluation queue, ``worker/evaluation_queue``);
  their answers are recorded in the local evaluator (its cache, disk cache and counters), so later hits stay
  local and ``seconds_per_plan`` still means the cost of one evaluation.

Every request is scored with the stability pre-screen (the search's rule; reports evaluate plans one by one
with :meth:`PlanEvaluator.evaluate`). Evaluation consumes no random numbers, so the order plans are scored in,
and where, does not change what a search or a training run computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from worker.hipp.evaluation.plan_evaluator import PlanEvaluation, PlanEvaluator, ScoringMode
from worker.hipp.progress import SILENT, Reporter
from worker.hipp.pruning.plan import PruningPlan

PlanRequest = tuple[PruningPlan, ScoringMode]


class PlanBatchEvaluator(Protocol):
    """Scores a batch of plans, each in its own scoring mode; answers in request order."""

    @property
    def evaluator(self) -> PlanEvaluator:
        """The local evaluator (its geometry, dense metrics, cache and counters)."""
        ...

    def evaluate_many(self, requests: Sequence[PlanRequest], reporter: Reporter = SILENT) -> list[PlanEvaluation]:
        """The evaluations of ``requests``, in order; ``reporter.check()`` raises on cancellation."""
        ...


class InProcessEvaluations:
    """The batch scored here, one plan after another, by ``evaluator``."""

    def __init__(self, evaluator: PlanEvaluator) -> None:
        self._evaluator = evaluator

    @property
    def evaluator(self) -> PlanEvaluator:
        return self._evaluator

    def evaluate_many(self, requests: Sequence[PlanRequest], reporter: Reporter = SILENT) -> list[PlanEvaluation]:
        results = []
        for plan, mode in requests:
            reporter.check()
            results.append(self._evaluator.evaluate(plan, mode=mode))
        return results


#: Evaluates plans elsewhere: the requests (no cache hits, each plan once) -> their evaluations, in order.
Send = Callable[[Sequence[PlanRequest], Reporter], list[PlanEvaluation]]


class DelegatedEvaluations:
    """Cache hits answered by ``evaluator``; the rest sent, each distinct plan once, through ``send``."""

    def __init__(self, evaluator: PlanEvaluator, send: Send) -> None:
        self._evaluator = evaluator
        self.send = send

    @property
    def evaluator(self) -> PlanEvaluator:
        return self._evaluator

    def evaluate_many(self, requests: Sequence[PlanRequest], reporter: Reporter = SILENT) -> list[PlanEvaluation]:
        reporter.check()
        results: list[PlanEvaluation | None] = [self._evaluator.cached(plan, mode) for plan, mode in requests]
        first: dict[str, int] = {}  # each missing plan's first request; repeats become local cache hits
        for i, (plan, _) in enumerate(requests):
            if results[i] is None:
                first.setdefault(plan.fingerprint, i)
        if first:
            answers = self.send([requests[i] for i in first.values()], reporter)
            if len(answers) != len(first):
                raise RuntimeError(f"sent {len(first)} plans for evaluation, got {len(answers)} answers")
            for i, answer in zip(first.values(), answers, strict=True):
                if answer.fingerprint != requests[i][0].fingerprint:
                    raise RuntimeError(f"asked to evaluate plan {requests[i][0].fingerprint}, got an answer for "
                                       f"{answer.fingerprint}")
                # A remote worker may have answered from its own cache: here it is a fresh evaluation.
                fresh = dataclasses.replace(answer, cached=False)
                self._evaluator.record(fresh)
                results[i] = fresh
        done = []
        for result, (plan, mode) in zip(results, requests, strict=True):
            result = result or self._evaluator.cached(plan, mode)
            if result is None:  # recorded above: only a broken evaluator forgets it
                raise RuntimeError(f"plan {plan.fingerprint} was evaluated but is not in the evaluator's cache")
            done.append(result)
        return done
