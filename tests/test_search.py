"""Policy training and plan search end to end on a tiny model, through the engine and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from worker.cli import main
from worker.hipp.data.calibration import synthetic_samples
from worker.hipp.errors import OptionError
from worker.hipp.evaluation.plan_evaluator import EvalSet, ScoringMode
from worker.hipp.policy.grpo import GRPOConfig
from worker.hipp.policy.search import dominates, pareto_front, prepare_search, sample_plans, train_policy
from worker.hipp.policy.store import find_policy, model_fingerprint
from worker.hipp.testbed.data import write_benchmarks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_benchmarks(root, seed=3, pope_images=6, sqa_sizes={"train": 2, "val": 10, "test": 2})
    return root


def test_train_store_and_query_a_policy(tiny_gqa, data, tmp_path):
    evalset = EvalSet.from_dirs(data / "pope", data / "scienceqa")
    setup = prepare_search(tiny_gqa, evalset, synthetic_samples(4), cache_dir=tmp_path / "cache")
    stored = train_policy(setup, tmp_path / "policy",
                          grpo_config=GRPOConfig(steps=2, preferences_per_step=1, group_size=3, seed=1))
    meta = stored.meta
    assert meta["model_fingerprint"] == model_fingerprint(tiny_gqa.adapter)
    assert meta["training"]["steps"] == 2 and meta["training"]["plan_evaluations"] >= 1
    assert (tmp_path / "policy" / "learning_curve.png").stat().st_size > 1000
    assert len((tmp_path / "policy" / "metrics.jsonl").read_text().splitlines()) == 2
    assert find_policy(str(tmp_path / "policy")).id == stored.id

    candidates = sample_plans(setup, stored, [0.1, 0.8, 0.1], samples=4, target=0.4, seed=0)
    # At a requested sparsity both allocation heads give their mean plan and half the samples.
    assert [(c.allocation, c.mean_plan) for c in candidates] == [
        ("matched", True), ("matched", False), ("matched", False), ("free", True), ("free", False), ("free", False)]
    assert {c.plan.meta["allocation_source"] for c in candidates} == {"matched", "free"}
    # Each source draws from its own stream: asked alone, it gives the same plans (a job's search is a subset).
    alone = {source: [c.plan.fingerprint for c in sample_plans(setup, stored, [0.1, 0.8, 0.1], samples=4,
                                                                target=0.4, seed=0, sources=(source,))]
             for source in ("matched", "free")}
    assert [c.plan.fingerprint for c in candidates] == alone["matched"][:3] + alone["free"][:3]
    with pytest.raises(OptionError, match="sources must be some of matched, free"):
        sample_plans(setup, stored, [0.1, 0.8, 0.1], samples=1, target=0.4, sources=("elsewhere",))
    for c in candidates:
        c.plan.validate()
        assert abs(c.plan.sparsity - 0.4) < 0.02
    front = pareto_front(candidates)
    assert front
    vectors = [c.evaluation.objectives.as_vector() for c in candidates if not c.evaluation.prescreened]
    for f in front:
        assert not any(dominates(v, f.evaluation.objectives.as_vector()) for v in vectors)

    # Free budget: compression is scored against the policy's s_max, not the one the setup was made with.
    stored.policy.config.s_max = 0.8
    free = [c for c in sample_plans(setup, stored, [0.1, 0.1, 0.8], samples=3, seed=0)
            if not c.evaluation.prescreened]
    assert free
    for c in free:
        assert c.evaluation.objectives.compression == pytest.approx(c.plan.sparsity / 0.8)
    # Each plan was scored in the policy's mode, passed per call: the shared evaluator's own mode is untouched.
    assert setup.evaluator.mode == ScoringMode(s_max=0.6, target_sparsity=None)

    # Plans the policy builds at an MLP-width multiple carry the rounding's cost, as planner plans do.
    rounded = sample_plans(dataclasses.replace(setup, mlp_multiple=8), stored, [0.1, 0.8, 0.1], samples=1,
                           target=0.4, seed=0)
    for c in rounded:
        assert all(len(lp.channels) % 8 == 0 for lp in c.plan.layers)
        cost = c.plan.meta["rounding"]
        assert cost["mlp_multiple"] == 8 and cost["removed"] == c.plan.removed_parameters()


def test_cli_policy_train_and_plan(data, tmp_path, capsys):
    common = ["--model", "tiny-llava", "--pope", str(data / "pope"), "--sqa", str(data / "scienceqa"),
              "--cache-dir", str(tmp_path / "cache"), "--calibration-samples", "4", "--quiet"]
    assert main(["policy", "train", *common, "--steps", "1", "--group-size", "2", "--preferences-per-step", "1",
                 "--out", str(tmp_path / "p")]) == 0
    assert main(["plan", *common, "--policy", str(tmp_path / "p"), "--preference", "0.2,0.7,0.1",
                 "--samples", "3", "--out", str(tmp_path / "plans.json"), "--plot", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "non-dominated" in out
    written = json.loads((tmp_path / "plans.json").read_text())
    assert len(written["candidates"]) == 4 and written["plans"]
    assert (tmp_path / "f.png").stat().st_size > 1000


@pytest.mark.parametrize(("pref", "message"), [("0.5,-1,0.5", "non-negative"), ("0,0,0", "all zero"),
                                               ("1,2", "needs 3 values"), ("a,b,c", "is not a number")])
def test_cli_plan_rejects_bad_preferences(pref, message, capsys):
    assert main(["plan", "--model", "tiny-llava", "--preference", pref, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_cli_plan_without_policy_or_data_says_what_to_do(data, tmp_path, capsys):
    assert main(["plan", "--model", "tiny-llava", "--preference", "1,1,1", "--quiet"]) == 2
    assert "--pope" in capsys.readouterr().err


def test_hypervolume_of_known_sets():
    from worker.hipp.policy.search import hypervolume

    assert hypervolume([(1.0, 1.0, 1.0)]) == pytest.approx(1.0)
    # Two boxes 2x1x1 and 1x2x1 overlap in a unit cube: 2 + 2 - 1.
    assert hypervolume([(2.0, 1.0, 1.0), (1.0, 2.0, 1.0)]) == pytest.approx(3.0)
    assert hypervolume([(2.0, 1.0), (1.0, 2.0)], (0.0, 0.0)) == pytest.approx(3.0)
    # A dominated point adds nothing; points below the reference count for nothing.
    assert hypervolume([(2.0, 2.0, 2.0), (1.0, 1.0, 1.0), (-1.0, 5.0, 5.0)]) == pytest.approx(8.0)
