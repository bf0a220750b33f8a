"""Bootstrap intervals over questions (worker/hipp/evaluation/intervals.py) from the outcomes metrics carry."""

from __future__ import annotations

import pytest

from worker.hipp.evaluation.intervals import (
    has_outcomes,
    interval,
    pack_bits,
    paired_difference,
    pope_mean,
    sqa_accuracy,
    unpack_bits,
)
from worker.hipp.evaluation.tasks import pope, scienceqa
from worker.hipp.evaluation.tasks.scienceqa import SqaProblem


@pytest.mark.parametrize("bits", [[], [True], [False, True, True], [True] * 9 + [False] * 8])
def test_bits_round_trip(bits):
    assert unpack_bits(pack_bits(bits), len(bits)).tolist() == bits


def pope_metrics(labels, answers):
    return pope.compute_metrics(answers, labels).to_dict()


def sqa_metrics(hits):
    problems = [SqaProblem(pid=str(i), question="q", choices=("a", "b"), answer=0, hint="", image="x", kind="presence")
                for i in range(len(hits))]
    return scienceqa.compute_metrics([0 if h else 1 for h in hits], problems).to_dict()


def plan(pope_correct: float, sqa_correct: float, n: int = 400) -> dict:
    labels = ["yes", "no"] * (n // 2)
    k = round(pope_correct * n)
    answers = [lab if i < k else ("no" if lab == "yes" else "yes") for i, lab in enumerate(labels)]
    return {"pope": {"random": pope_metrics(labels, answers), "popular": pope_metrics(labels, answers)},
            "scienceqa": sqa_metrics([i < round(sqa_correct * n) for i in range(n)])}


def test_metrics_carry_their_outcomes_and_the_interval_covers_the_estimate():
    m = plan(0.9, 0.7)
    assert has_outcomes(m) and not has_outcomes({"pope": {"random": {"n": 1}}})
    assert m["pope"]["random"]["balanced_accuracy"] == pytest.approx(0.9)
    low, high = interval(m, pope_mean)
    assert low < 0.9 < high and high - low < 0.08
    low, high = interval(m, sqa_accuracy)
    # Binomial: 0.7 +/- 1.96 * sqrt(0.21 / 400) = +/- 0.045.
    assert low == pytest.approx(0.655, abs=0.012) and high == pytest.approx(0.745, abs=0.012)


def test_the_paired_interval_is_narrower_than_the_unpaired_one_when_plans_share_their_questions():
    a, b = plan(0.9, 0.80), plan(0.88, 0.78)  # b answers a subset of what a answers correctly
    low, high = paired_difference(a, b, sqa_accuracy)
    assert 0 < low <= 0.02 <= high  # every disagreement favours a: the difference is clearly positive
    unpaired = 1.96 * ((0.8 * 0.2 + 0.78 * 0.22) / 400) ** 0.5
    assert high - low < unpaired
    assert paired_difference(a, a, pope_mean) == (0.0, 0.0)
