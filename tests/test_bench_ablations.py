"""The ablation bench's arithmetic: seed means and ranges per variant, and the seed-paired difference from the
full policy with its interval by bootstrap over questions (on hand-made outcomes; the runs are benchmarks)."""

from __future__ import annotations

import random

import pytest

from bench import ablations
from bench.frozen import SPARSITIES
from worker.hipp.evaluation.intervals import mean_paired_difference, pack_bits, pope_mean, sqa_accuracy

N = 200
LABELS = [i % 2 == 0 for i in range(N)]
DENSE = {"pope": {"random": {"balanced_accuracy": 0.95, "yes_ratio": 0.5}}, "scienceqa": {"accuracy": 0.9}}


def outcomes(pope_right: float, sqa_right: float, seed: int) -> dict:
    """Per-question outcomes with about ``pope_right`` of POPE and ``sqa_right`` of SQA answered right."""
    rng = random.Random(seed)
    yes = [label if rng.random() < pope_right else not label for label in LABELS]
    correct = [rng.random() < sqa_right for _ in range(N)]
    return {"pope": {"random": {"n": N, "per_question": {"label": pack_bits(LABELS), "yes": pack_bits(yes)}}},
            "scienceqa": {"n": N, "per_question": {"correct": pack_bits(correct)}}}


def plan_row(s: float, pope_right: float, sqa_right: float, seed: int, layer0: float) -> dict:
    out = outcomes(pope_right, sqa_right, seed)
    return {"requested": s, "sparsity": s, "pope_bacc": float(pope_mean(out, {"random": _all()})[0]),
            "sqa": float(sqa_accuracy(out, {"scienceqa": _all()})[0]), "layer0": layer0, "outcomes": out}


def _all():
    import torch

    return torch.arange(N).unsqueeze(0)


def policy(variant: str, seed: int, pope_right: float, layer0: float) -> dict:
    rows = [plan_row(s, pope_right, 0.8, 100 * seed + i, layer0) for i, s in enumerate(SPARSITIES)]
    return {"variant": variant, "seed": seed, "rows": rows, "hypervolume": 0.5 + seed / 100, "last_return": 1.0}


def test_identical_plans_differ_by_nothing_and_better_plans_by_an_interval_above_zero():
    same = outcomes(0.9, 0.8, 1)
    assert mean_paired_difference([(same, same)] * 3, pope_mean) == (0.0, 0.0)
    better = [(outcomes(0.95, 0.8, s), outcomes(0.6, 0.8, s + 50)) for s in range(3)]
    low, high = mean_paired_difference(better, pope_mean)
    assert 0 < low < high
    with pytest.raises(ValueError):
        mean_paired_difference([], pope_mean)


def test_summary_pairs_each_variant_with_the_full_policy_by_seed():
    policies = [policy(v, s, 0.95 if v == "full" else 0.7, 0.0 if v == "full" else 0.5)
                for v in ("full", "no-visual") for s in ablations.SEEDS]
    summary = ablations.summarize(policies, DENSE)
    full, ablated = summary["variants"]["full"], summary["variants"]["no-visual"]
    assert full["seeds"] == list(ablations.SEEDS) and "pope_diff" not in full["cells"][0]
    cell = ablated["cells"][0]
    assert cell["requested"] == SPARSITIES[0]
    assert len(cell["pope_diff_per_seed"]) == 3 and all(d < 0 for d in cell["pope_diff_per_seed"])
    assert cell["pope_diff"] == pytest.approx(sum(cell["pope_diff_per_seed"]) / 3, abs=1e-3)
    assert cell["pope_diff_ci"][1] < 0  # clearly worse on every seed: the interval excludes zero
    assert cell["pope_bacc_range"][0] <= cell["pope_bacc"] <= cell["pope_bacc_range"][1]
    assert ablated["layer0_mean"] == 0.5 and full["layer0_mean"] == 0.0
    assert full["hypervolume_range"] == [0.5, 0.52]
    text = ablations.markdown({"summary": summary})
    assert "no-visual" in text and "POPE diff 50%" in text


def test_missing_policies_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ablations", "--policies", str(tmp_path)])
    with pytest.raises(SystemExit, match="no-visual-s0"):
        ablations.main()
