"""The frozen-protocol report's arithmetic: hypervolume against the best baseline, pooling HiPP's lead over the
members with an interval, and the goal checks (tested on hand-made member results; the runs themselves are
benchmarks)."""

from __future__ import annotations

import pytest

from bench import frozen
from bench.verdict import HIPP

DENSE = {"pope": {"random": {"balanced_accuracy": 0.95}}, "scienceqa": {"accuracy": 0.9}}


def row(name, s, pope, sqa):
    return {"baseline": name, "requested": s, "sparsity": s, "pope_bacc": pope, "sqa": sqa}


def test_objectives_are_relative_to_the_dense_model():
    u, r, c = frozen.objectives(row("x", 0.4, 0.725, 0.45), DENSE)
    assert (u, r, c) == pytest.approx((0.5, 0.5, 0.4 / frozen.S_MAX))


def test_hypervolume_ratio_is_against_the_best_baseline_on_the_same_grid():
    rows = [row(HIPP, 0.5, 0.95, 0.9), row("a", 0.5, 0.95, 0.45), row("b", 0.5, 0.725, 0.9),
            {"baseline": "c", "requested": 0.5, "infeasible": "x"}, row("dense", 0.0, 0.95, 0.9)]
    hv = frozen.hypervolumes([r for r in rows if "infeasible" not in r], [], DENSE)
    # One point each: the box volume u * r * c.
    assert hv["hipp"] == pytest.approx(1 * 1 * 0.5 / frozen.S_MAX, abs=1e-4)
    assert hv["best"] == pytest.approx(0.5 * 1 * 0.5 / frozen.S_MAX, abs=1e-4)
    assert hv["ratio"] == pytest.approx(2.0, abs=1e-3)
    front = [row("HiPP front", 0.7, 0.95, 0.9)]  # dominates the matched point: the front only adds volume
    assert frozen.hypervolumes([r for r in rows if "infeasible" not in r], front, DENSE)["ratio_with_front"] > 2.0


def member(model, diffs):
    verdict = [{"requested": s, "pope": {"difference": d, "low": d - 0.02, "high": d + 0.02},
                "sqa": {"difference": 0.0, "low": -0.01, "high": 0.01}} for s, d in diffs.items()]
    return {"model": model, "world_seed": 7, "design": "abc", "verdict": verdict, "hypervolume": {"ratio": 1.3}}


def test_pooled_lead_is_the_members_mean_with_an_interval_and_spread():
    members = [member("a", {0.5: 0.04, 0.6: 0.02}), member("b", {0.5: 0.06})]
    pooled = frozen.pooled(members, "pope", 0.5)
    assert pooled["mean"] == pytest.approx(0.05) and pooled["members"] == 2
    se = (2 * (0.02 / 1.96) ** 2) ** 0.5 / 2
    assert pooled["low"] == pytest.approx(0.05 - 1.96 * se, abs=1e-4)
    assert (pooled["min"], pooled["max"]) == (0.04, 0.06)
    assert frozen.pooled(members, "pope", 0.6)["members"] == 1
    assert frozen.pooled(members, "pope", 0.7) is None


def test_goal_checks_need_three_points_with_the_interval_above_zero():
    ahead = frozen.summarize([member("a", {0.5: 0.05, 0.6: 0.05, 0.7: 0.05})])
    assert all(g["pope_goal_met"] and g["sqa_not_lower"] for g in ahead["goal"]) and ahead["hypervolume_goal_met"]
    level = frozen.summarize([member("a", {0.5: 0.01, 0.6: 0.0, 0.7: -0.03})])
    assert not any(g["pope_goal_met"] for g in level["goal"])
    assert "no" in frozen.summary_markdown(level)


def test_each_report_keeps_its_folder_and_the_newest_summarized_one_is_last(tmp_path, monkeypatch):
    from bench.protocol import claim

    ledger = tmp_path / "protocol.json"
    monkeypatch.setattr(frozen, "OUT", tmp_path / "frozen")
    for seed, design in ((11, "aaa"), (12, "bbb"), (13, "ccc")):
        claim(seed, "frozen", ledger, design=design)
    claim(11, "frozen", ledger, design="aaa")  # the same report again: not a new entry
    for seed in (11, 12):  # 13 claimed but never summarized (a run given up): not a report
        frozen.report_dir(seed).mkdir(parents=True)
        (frozen.report_dir(seed) / "frozen.json").write_text("{}")
    assert frozen.report_dir(12) == tmp_path / "frozen" / "12"
    assert frozen.reported_seeds(ledger) == [11, 12]
